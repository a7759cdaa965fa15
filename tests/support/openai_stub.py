"""A local OpenAI-compatible ``/v1/chat/completions`` server whose replies depend on the
requested model name (see ``OpenAIStubHandler.do_POST``): retries, errors, tool calls, sloppy
answers, a tool-using agent. Like ``vllm serve --enable-lora`` with runtime updates, it loads and
unloads LoRA adapters (``/v1/load_lora_adapter``, ``/v1/unload_lora_adapter``), and a loaded
adapter answers as the tool-using agent. ``openai_server`` in ``tests/conftest.py`` runs it on loopback."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class OpenAIStubHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep test output clean
        pass

    def do_POST(self):
        server = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with server.lock:
            server.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
            if self.path.endswith("_lora_adapter"):
                return self._adapters(body)
            count = server.counts[body["model"]] = server.counts.get(body["model"], 0) + 1
        model = body["model"]
        if model.startswith("policy-") and model not in server.adapters:
            return self._send(404, {"error": f"The model `{model}` does not exist."})
        if model == "flaky" and count == 1:
            return self._send(500, {"error": "try again"})
        if model == "ratelimited" and count == 1:
            return self._send(429, {"error": "slow down"}, {"Retry-After": "0"})
        if model == "bad":
            return self._send(400, {"error": "bad request"})
        if model == "slow":
            time.sleep(1.5)
        if model == "sleepy":
            time.sleep(0.4)
        message = {"role": "assistant", "content": f"echo: {body['messages'][-1]['content'][:40]}"}
        if model == "tools":
            message = {"role": "assistant", "content": "Analysis: a\nPlan: b", "tool_calls": [
                {"id": "x1", "type": "function", "function": {"name": "get_item_info", "arguments": "{\"label\": \"C2\"}"}},
                {"id": "x2", "type": "function", "function": {"name": "get_item_info", "arguments": "{oops"}}]}
        if model == "sloppy":  # an answer with a repeat and an invented label
            message = {"role": "assistant", "content": "Analysis: done.\nPlan: rank.\n<answer>C3, C3, C8, C1</answer>"}
        if model == "agent" or model in server.adapters:  # a tool call first, the answer once a tool result is in
            if any(m["role"] == "tool" for m in body["messages"]):
                message = {"role": "assistant", "content": "Analysis: done.\nPlan: rank.\n<answer>C2, C1, C3, C4</answer>"}
            else:
                message = {"role": "assistant", "content": "Analysis: a\nPlan: b", "tool_calls": [
                    {"id": "k", "type": "function", "function": {"name": "get_item_info", "arguments": "{\"label\": \"C2\"}"}}]}
        self._send(200, {"choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                         "usage": {"prompt_tokens": 50, "completion_tokens": 7, "total_tokens": 57}})

    def _adapters(self, body):
        """vLLM's runtime LoRA updates: the folder must hold an adapter; names are unique."""
        server, name = self.server, body.get("lora_name", "")
        if self.path.endswith("/v1/load_lora_adapter"):
            if name in server.adapters:
                return self._send(400, {"error": f"The lora adapter '{name}' has already been loaded."})
            if not (Path(body.get("lora_path", "")) / "adapter_config.json").is_file():
                return self._send(400, {"error": f"No adapter found for {body.get('lora_path')!r}"})
            server.adapters.add(name)
            return self._send(200, "Success: LoRA adapter loaded")
        if self.path.endswith("/v1/unload_lora_adapter") and name in server.adapters:
            server.adapters.remove(name)
            return self._send(200, "Success: LoRA adapter unloaded")
        return self._send(404, {"error": f"no adapter {name!r} ({self.path})"})

    def _send(self, status, payload, headers=None):
        data = json.dumps(payload).encode()
        try:
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
            pass


@contextmanager
def openai_stub_server() -> Iterator[ThreadingHTTPServer]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), OpenAIStubHandler)
    httpd.daemon_threads = True
    httpd.requests, httpd.counts, httpd.lock = [], {}, threading.Lock()  # type: ignore[attr-defined]
    httpd.adapters = set()  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()
