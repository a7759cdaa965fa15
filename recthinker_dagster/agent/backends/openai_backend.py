"""Backend for any OpenAI-compatible ``/v1/chat/completions`` server (vLLM, SGLang, OpenAI).

Standard library only. Settings come from arguments or the environment:
``OPENAI_BASE_URL`` (e.g. ``http://localhost:8000/v1``; ``/v1`` is added when missing),
``OPENAI_API_KEY`` (optional for local servers) and ``RECTHINKER_LLM_MODEL``.

- Concurrency: a batch is sent as ``concurrency`` parallel requests (threads).
- Timeouts: ``timeout_s`` per socket operation (connect, and each read while waiting).
- Retries: on timeouts, connection errors, 408/409/425/429 and 5xx, up to ``max_retries``
  times with exponential backoff (``backoff_s * 2**attempt``, jittered, capped at
  ``max_backoff_s``; a ``Retry-After`` header wins when it is shorter than the cap). Other
  errors fail at once. A request that still fails gives a ``Generation`` with
  ``finish_reason="error"``; it never raises.
- Tokens: from the response's ``usage``.
- Tool calls the server returns as structured ``tool_calls`` are written back into the text
  in the ``<tool_call>{json}</tool_call>`` form, so one parser reads every backend.

Messages go on the wire in OpenAI form: tool-call arguments as JSON strings, ``tool``
messages by ``tool_call_id``; a tool message without an id (the error observation for an
unparseable call) is sent as a user message holding a ``<tool_response>`` block.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from recthinker_dagster.agent.backends.base import Generation, SamplingParams, tools_for
from recthinker_dagster.agent.parser import format_tool_call

RETRY_STATUS = {408, 409, 425, 429}
ENV_BASE_URL, ENV_API_KEY, ENV_MODEL = "OPENAI_BASE_URL", "OPENAI_API_KEY", "RECTHINKER_LLM_MODEL"


class OpenAICompatibleBackend:
    def __init__(
        self,
        base_url: str | None = None,
        model: str | None = None,
        api_key: str | None = None,
        *,
        concurrency: int = 8,
        timeout_s: float = 120.0,
        max_retries: int = 4,
        backoff_s: float = 1.0,
        max_backoff_s: float = 30.0,
        extra_body: dict | None = None,
        name: str | None = None,
    ):
        base_url = base_url or os.environ.get(ENV_BASE_URL)
        self.model = model or os.environ.get(ENV_MODEL)
        if not base_url or not self.model:
            raise ValueError(
                f"set base_url and model (or ${ENV_BASE_URL} and ${ENV_MODEL}) for the OpenAI-compatible backend"
            )
        self.url = chat_completions_url(base_url)
        self.api_key = api_key_from(api_key)
        self.concurrency = max(1, concurrency)
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.extra_body = dict(extra_body or {})
        self.name = name or self.model
        self._opener = url_opener(self.url)

    def generate(
        self,
        conversations: Sequence[list[dict]],
        tools: Sequence[list[dict] | None] | None,
        params: SamplingParams,
    ) -> list[Generation]:
        tool_lists = tools_for(tools, len(conversations))
        if len(conversations) <= 1:
            return [self.complete(m, t, params) for m, t in zip(conversations, tool_lists)]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(conversations))) as pool:
            return list(pool.map(lambda pair: self.complete(pair[0], pair[1], params), zip(conversations, tool_lists)))

    def complete(self, messages: list[dict], tools: list[dict] | None, params: SamplingParams) -> Generation:
        """One chat completion, with retries."""
        payload = self.payload(messages, tools, params)
        started = time.perf_counter()
        error = "no attempt made"
        for attempt in range(self.max_retries + 1):
            retry_after = None
            try:
                status, headers, body = self._post(payload)
            except (TimeoutError, OSError, urllib.error.URLError) as exc:  # timeouts, refused, reset
                error, retryable = f"{type(exc).__name__}: {exc}", True
            else:
                if status == 200:
                    try:
                        generation = parse_response(json.loads(body))
                    except (ValueError, KeyError, IndexError, TypeError) as exc:
                        error, retryable = f"bad response: {type(exc).__name__}: {exc}", True
                    else:
                        generation.seconds = time.perf_counter() - started
                        return generation
                else:
                    error = f"HTTP {status}: {body[:300].decode('utf-8', 'replace')}"
                    retryable = status in RETRY_STATUS or status >= 500
                    retry_after = _retry_after(headers.get("retry-after"))
            if not retryable or attempt == self.max_retries:
                break
            delay = min(self.max_backoff_s, self.backoff_s * 2**attempt) * random.uniform(0.5, 1.0)
            if retry_after is not None:
                delay = min(self.max_backoff_s, retry_after)
            time.sleep(delay)
        return Generation("", seconds=time.perf_counter() - started, finish_reason="error", error=error)

    def payload(self, messages: list[dict], tools: list[dict] | None, params: SamplingParams) -> dict:
        body = {
            "model": self.model,
            "messages": to_wire_messages(messages),
            "max_tokens": params.max_new_tokens,
            "temperature": max(0.0, params.temperature),
            "top_p": params.top_p,
            "stream": False,
        }
        if params.seed is not None:
            body["seed"] = params.seed
        if tools:
            body["tools"] = list(tools)
        body.update(self.extra_body)
        return body

    def _post(self, payload: dict) -> tuple[int, dict, bytes]:
        return post_json(self._opener, self.url, payload, self.api_key, self.timeout_s)


def api_key_from(api_key: str | None) -> str | None:
    return api_key if api_key is not None else os.environ.get(ENV_API_KEY)


def url_opener(url: str) -> urllib.request.OpenerDirector:
    """An opener that bypasses any proxy for loopback servers."""
    host = urllib.parse.urlsplit(url).hostname or ""
    return urllib.request.build_opener(*([urllib.request.ProxyHandler({})] if _is_loopback(host) else []))


def post_json(opener: urllib.request.OpenerDirector, url: str, payload: dict, api_key: str | None,
              timeout_s: float) -> tuple[int, dict, bytes]:
    """POST ``payload`` as JSON: (status, lower-cased headers, body); HTTP errors are returned, not raised."""
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), headers=headers, method="POST")
    try:
        with opener.open(request, timeout=timeout_s) as response:
            return response.status, _lower_keys(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, _lower_keys(exc.headers or {}), exc.read() or b""


def v1_url(base_url: str) -> str:
    """The server's ``/v1`` root, from a base URL with or without ``/v1`` or ``/chat/completions``."""
    base = base_url.rstrip("/").removesuffix("/chat/completions")
    return base if base.endswith("/v1") else base + "/v1"


def chat_completions_url(base_url: str) -> str:
    return v1_url(base_url) + "/chat/completions"


def to_wire_messages(messages: Sequence[dict]) -> list[dict]:
    """Our messages (dict arguments, id-less error observations) in OpenAI wire form."""
    wire = []
    for message in messages:
        role = message["role"]
        if role == "assistant" and message.get("tool_calls"):
            wire.append({
                "role": "assistant",
                "content": message.get("content") or "",
                "tool_calls": [_wire_tool_call(call, k) for k, call in enumerate(message["tool_calls"])],
            })
        elif role == "tool" and message.get("tool_call_id"):
            wire.append({"role": "tool", "tool_call_id": message["tool_call_id"], "content": message["content"]})
        elif role == "tool":
            wire.append({"role": "user", "content": f"<tool_response>\n{message['content']}\n</tool_response>"})
        else:
            wire.append({"role": role, "content": message.get("content") or ""})
    return wire


def parse_response(data: dict) -> Generation:
    """A chat-completions response as a ``Generation``; structured tool calls become text."""
    choice = data["choices"][0]
    message = choice.get("message") or {}
    parts = [message.get("content") or ""]
    for call in message.get("tool_calls") or []:
        function = call.get("function") or {}
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError:
                pass  # left as raw text: the parser reports malformed JSON
        parts.append(format_tool_call(str(function.get("name", "")), arguments))
    finish = choice.get("finish_reason") or "stop"
    usage = data.get("usage") or {}
    return Generation(
        text="\n".join(part for part in parts if part),
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        completion_tokens=int(usage.get("completion_tokens") or 0),
        finish_reason="length" if finish == "length" else "stop",
    )


def _wire_tool_call(call: dict, index: int) -> dict:
    function = call.get("function", call)
    arguments = function.get("arguments", {})
    return {
        "id": call.get("id") or f"call_{index}",
        "type": "function",
        "function": {
            "name": function.get("name", ""),
            "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False),
        },
    }


def _lower_keys(headers) -> dict:
    return {str(key).lower(): value for key, value in dict(headers).items()}


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
