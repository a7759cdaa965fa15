"""GRPO rollouts on a generation server that loads LoRA adapters at runtime (``vllm serve``).

The server serves the policy RL starts from as one model (``recthinker merge OUT BASE SFT_ADAPTER``)
with LoRA enabled and runtime adapter updates allowed::

    VLLM_ALLOW_RUNTIME_LORA_UPDATING=True vllm serve OUT --enable-lora --max-lora-rank 16

Before each step's rollouts, ``PolicyServer`` saves the RL adapter being trained into a folder the
server can read, loads it under a new name (``POST /v1/load_lora_adapter``), unloads the previous
step's, and hands the rollout an OpenAI-compatible backend that samples from it. The agent loop
and the tools stay in the trainer's process; the server only generates.

A server returns text, not the sampled token ids: GRPO then trains on the conversation rendered
through the training chat template (``training.grpo.split_conversation``) and logs no
sampler-trainer log-prob gap. Its answers are not constrained to the candidate labels; they take
the agent's documented repair, counted in ``rollout/valid_rate``.
"""

from __future__ import annotations

import json
import os
import shutil
import urllib.error
from pathlib import Path

from recthinker_dagster.agent.backends.openai_backend import (
    OpenAICompatibleBackend,
    api_key_from,
    post_json,
    url_opener,
    v1_url,
)

SERVED_ADAPTERS = "served_adapters"  # in a run's folder: each step's adapter, for the server to load
SERVER_SETUP = ("serve the RL start policy (`recthinker merge OUT BASE SFT_ADAPTER`) with "
                "`VLLM_ALLOW_RUNTIME_LORA_UPDATING=True vllm serve OUT --enable-lora --max-lora-rank R`, "
                "R at least the recipe's lora_r, and give the adapters folder a path the server can read")


class PolicyServerError(RuntimeError):
    """The generation server could not take the policy being trained."""


class PolicyServer:
    """A ``backend_factory`` for ``ToolRollout``: each call publishes the policy's current LoRA
    adapter on the server under a new name and returns a backend that samples from it."""

    def __init__(self, base_url: str, adapters_dir: str | os.PathLike, *, api_key: str | None = None,
                 concurrency: int = 8, timeout_s: float = 120.0):
        self.root = v1_url(base_url)
        self.adapters_dir = Path(adapters_dir)
        self.api_key = api_key_from(api_key)
        self.concurrency, self.timeout_s = concurrency, timeout_s
        self.current: str | None = None
        self.published = 0
        self._opener = url_opener(self.root)

    def __call__(self, model, tokenizer) -> OpenAICompatibleBackend:
        name = self.publish(model)
        return OpenAICompatibleBackend(self.root, model=name, api_key=self.api_key, concurrency=self.concurrency,
                                       timeout_s=self.timeout_s, name="policy")

    def publish(self, model) -> str:
        """Save ``model``'s adapter, load it on the server, unload the previous one; its name."""
        if not hasattr(model, "peft_config"):
            raise PolicyServerError("rollouts on a generation server need a LoRA policy: the server loads the "
                                    f"adapter being trained at every step, and {type(model).__name__} has none")
        self.published += 1
        name = f"policy-{os.getpid()}-{self.published}"  # unique per process and step: never a stale adapter
        folder = self.adapters_dir / name
        model.save_pretrained(str(folder))
        self._post("load_lora_adapter", {"lora_name": name, "lora_path": str(folder.resolve())})
        previous, self.current = self.current, name
        if previous is not None:
            self._unload(previous)
        return name

    def close(self) -> None:
        """Unload the last published adapter (the server keeps running)."""
        if self.current is not None:
            self._unload(self.current)
            self.current = None

    def _unload(self, name: str) -> None:
        self._post("unload_lora_adapter", {"lora_name": name})
        shutil.rmtree(self.adapters_dir / name, ignore_errors=True)

    def _post(self, endpoint: str, payload: dict) -> None:
        url = f"{self.root}/{endpoint}"
        try:
            status, _, body = post_json(self._opener, url, payload, self.api_key, self.timeout_s)
        except (TimeoutError, OSError, urllib.error.URLError) as error:
            raise PolicyServerError(f"cannot reach the generation server at {self.root}: {error}") from error
        if status != 200:
            text = body[:300].decode("utf-8", "replace")
            raise PolicyServerError(f"the generation server at {self.root} answered {endpoint} "
                                    f"{json.dumps(payload)} with HTTP {status}: {text}. To train on it, {SERVER_SETUP}.")


def policy_server(url: str | None, run_dir: str | os.PathLike, concurrency: int = 8) -> PolicyServer | None:
    """The rollouts' backend factory on the generation server at ``url``; None (sample in-process) without one."""
    return PolicyServer(url, Path(run_dir) / SERVED_ADAPTERS, concurrency=concurrency) if url else None
