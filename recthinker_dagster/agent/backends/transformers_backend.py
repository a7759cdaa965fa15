"""Local ``transformers`` backend: batched generation, with the shared prompt prefix cached.

One ``generate`` call serves a whole batch: prompts are rendered with the chat template,
sorted by length, split into chunks of ``batch_size`` and each chunk is generated in one
``model.generate`` call (left padding, attention mask, stop on ``<|im_end|>``).

Shared-prefix KV cache: every agent prompt starts with the same system prompt and tool schemas
(hundreds of tokens). The backend computes the KV cache of the longest token prefix a chunk
shares once, keeps it (a small LRU across calls, so every later turn reuses it), and prefills
only the rest. Rows are laid out ``[prefix][padding][own tokens]``; the attention mask hides
the padding and positions come from the mask, so the result equals plain left padding
(``tests/test_backends.py`` checks it token for token). It applies to models with full
attention only (no sliding windows).

KV cache: a preallocated ``StaticCache`` per generate call (``static_cache=True``). The
default growing cache re-copies every row's whole KV at each decoding step (``torch.cat``):
58% of a batch-16 decoding step at 1,800 tokens on CPU; the static cache cut that step from
0.47 s to 0.19 s.

``dtype="auto"``: bfloat16 on GPUs that support it and on CPUs with native bf16 (AVX512-BF16
or AMX), float32 elsewhere. On a 2-core AMX Xeon, batched bf16 ran 1.75-1.85x faster than
float32; single-stream decoding was about even (``scripts/benchmark_inference.py``). Greedy
bf16 output is not batch-invariant (about half the texts differ from one-at-a-time runs);
float32 output is identical token for token.

Answers: with ``answers=[AnswerSpec, ...]`` every ``<answer>`` the model opens is decoded under
:class:`~recthinker_dagster.agent.backends.constrained.AnswerConstraint` (a permutation of the
labels, or the label head's ranking in ``logits`` mode). A row that hits ``max_new_tokens``
inside its answer is continued (same state, only the tokens the answer still needs), so a
constrained answer is never cut off. ``rank_labels`` is the label head on its own: one
forward pass over a conversation plus ``<answer>``.

Threads: ``from_pretrained`` sets torch threads to the available cores. On a machine shared
with other busy processes, run with ``OMP_WAIT_POLICY=PASSIVE`` (set before Python starts):
spinning OpenMP threads that lose their core made 2-thread decoding up to 10x slower.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from recthinker_dagster.agent.backends.base import AnswerSpec, Generation, SamplingParams, head_ranking, tools_for
from recthinker_dagster.agent.backends.chat_template import (
    ensure_tool_chat_template,
    render_prompt,
    stop_token_ids,
)
from recthinker_dagster.agent.backends.constrained import ANSWER_OPEN, AnswerConstraint, AnswerState, LabelTokens
from recthinker_dagster.agent.labels import label_token_problems

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def cpu_has_fast_bf16() -> bool:
    """Native bf16 matrix instructions (AVX512-BF16 or AMX), read from /proc/cpuinfo (Linux)."""
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="ignore")
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype != "auto":
        return DTYPES[dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class TransformersBackend:
    """Generate with an in-process model; ``from_pretrained`` loads one from a folder."""

    constrains_answers = True  # ``generate`` takes ``answers=`` (see the module docstring)

    def __init__(
        self,
        model,
        tokenizer,
        *,
        name: str | None = None,
        batch_size: int = 16,
        prefix_cache: bool = True,
        min_prefix_tokens: int = 64,
        max_cached_prefixes: int = 4,
        static_cache: bool = True,
        chat_template: str = "auto",
    ):
        self.model = model.eval()
        self.tokenizer = ensure_tool_chat_template(tokenizer, chat_template)
        self.name = name or getattr(model.config, "_name_or_path", "") or type(model).__name__
        self.batch_size = max(1, batch_size)
        self.prefix_cache = prefix_cache and _full_attention_only(model.config)
        self.min_prefix_tokens = min_prefix_tokens
        self.max_cached_prefixes = max_cached_prefixes
        self.static_cache = static_cache
        self.max_context_tokens = getattr(model.config.get_text_config(), "max_position_embeddings", None)
        self.stop_ids = stop_token_ids(tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[0]
        self._prefixes: OrderedDict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]] = OrderedDict()
        self._label_tokens: dict[tuple[str, ...], LabelTokens] = {}
        self.stats = {"prompt_tokens": 0, "prefix_tokens_reused": 0, "completion_tokens": 0, "padded_tokens": 0}

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        dtype: str = "auto",
        device: str = "auto",
        num_threads: int | None = None,
        **kwargs,
    ) -> TransformersBackend:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        target = resolve_device(device)
        if target.type == "cpu":
            torch.set_num_threads(num_threads or available_cores())
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype, target)).to(target)
        kwargs.setdefault("name", Path(path).name)
        return cls(model, tokenizer, **kwargs)

    # -- the Backend interface -------------------------------------------------------------

    def generate(
        self,
        conversations: Sequence[list[dict]],
        tools: Sequence[list[dict] | None] | None,
        params: SamplingParams,
        answers: Sequence[AnswerSpec | None] | None = None,
    ) -> list[Generation]:
        tool_lists = tools_for(tools, len(conversations))
        specs = list(answers) if answers is not None else [None] * len(conversations)
        prompts = [self.encode(messages, tool_list) for messages, tool_list in zip(conversations, tool_lists)]
        results: list[Generation | None] = [None] * len(prompts)
        limit = self.max_context_tokens
        for i, prompt in enumerate(prompts):
            if limit and len(prompt) + params.max_new_tokens > limit:
                results[i] = Generation("", prompt_tokens=len(prompt), finish_reason="error", error=(
                    f"context overflow: {len(prompt)} prompt + {params.max_new_tokens} new tokens > {limit}"))
        todo = [i for i in range(len(prompts)) if results[i] is None]
        order = sorted(todo, key=lambda i: len(prompts[i]), reverse=True)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            generations = self.generate_ids([prompts[i] for i in chunk], params, [specs[i] for i in chunk])
            for index, generation in zip(chunk, generations):
                results[index] = generation
        return results  # type: ignore[return-value]

    def labels_fit(self, labels: Sequence[str]) -> bool:
        """Whether every label is one token of this tokenizer (``agent/labels.py``)."""
        return not label_token_problems(self.tokenizer, labels)

    def rank_labels(
        self,
        conversations: Sequence[list[dict]],
        tools: Sequence[list[dict] | None] | None,
        labels: Sequence[Sequence[str]],
    ) -> list[dict[str, float]]:
        """The label head: each conversation plus an assistant turn opened with ``<answer>``, one
        forward pass, and every label's log-probability at the next position."""
        tool_lists = tools_for(tools, len(conversations))
        rows = [self.tokenizer(render_prompt(self.tokenizer, messages, tool_list) + ANSWER_OPEN,
                               add_special_tokens=False)["input_ids"]
                for messages, tool_list in zip(conversations, tool_lists)]
        return self.label_scores(rows, [self.label_tokens(label_set) for label_set in labels])

    def label_tokens(self, labels: Sequence[str]) -> LabelTokens:
        key = tuple(labels)
        if key not in self._label_tokens:
            self._label_tokens[key] = LabelTokens.build(self.tokenizer, key, self.stop_ids[0])
        return self._label_tokens[key]

    # -- pieces, public for benchmarks and tests -----------------------------------------------

    def encode(self, messages: Sequence[dict], tools: Sequence[dict] | None = None) -> list[int]:
        text = render_prompt(self.tokenizer, messages, tools)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @torch.inference_mode()
    def generate_ids(self, rows: Sequence[list[int]], params: SamplingParams,
                     answers: Sequence[AnswerSpec | None] | None = None) -> list[Generation]:
        """One ``model.generate`` call for prompts given as token ids (plus, with ``answers``, the
        continuation of answers cut off by ``max_new_tokens`` and the head of multi-token labels)."""
        started = time.perf_counter()
        if not params.greedy and params.seed is not None:
            torch.manual_seed(params.seed)
        states = self._answer_states(answers, len(rows))
        new_tokens = self._generate_rows(rows, params, states, fresh=True)
        if states is not None:
            self._finish_answers(rows, new_tokens, params, states)
        seconds = time.perf_counter() - started
        return [self._finish(row, tokens, seconds, states[i] if states else None)
                for i, (row, tokens) in enumerate(zip(rows, new_tokens))]

    def _answer_states(self, answers, n: int) -> list[AnswerState | None] | None:
        if answers is None or not any(spec is not None for spec in answers):
            return None
        if len(answers) != n:
            raise ValueError(f"got {len(answers)} answer specs for {n} prompts")
        return [None if spec is None else AnswerState(self.label_tokens(spec.labels), spec.mode) for spec in answers]

    def _generate_rows(self, rows: Sequence[list[int]], params: SamplingParams,
                       states: Sequence[AnswerState | None] | None, *, fresh: bool) -> list[list[int]]:
        """The new tokens of every row (one ``model.generate`` call; padding after a stop included)."""
        from transformers import LogitsProcessorList

        prefix_len, prefix_kv = self._prefix_for(rows)
        input_ids, attention_mask = self._layout(rows, prefix_len)
        cache = self._new_cache(len(rows), input_ids.shape[1] + params.max_new_tokens, prefix_len, prefix_kv)
        processors = LogitsProcessorList()
        if states is not None:
            processors.append(AnswerConstraint(self.tokenizer, states, self.stop_ids, fresh=fresh))
        output = self.model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            past_key_values=cache,
            generation_config=self._generation_config(params),
            logits_processor=processors,
        )
        self.stats["prefix_tokens_reused"] += prefix_len * len(rows) if prefix_kv is not None else 0
        self.stats["padded_tokens"] += int(attention_mask.numel() - attention_mask.sum())
        return output[:, input_ids.shape[1] :].tolist()

    def _finish_answers(self, rows: Sequence[list[int]], new_tokens: list[list[int]], params: SamplingParams,
                        states: Sequence[AnswerState | None]) -> None:
        """Continue answers cut off by the token limit, then rank multi-token labels by the head."""
        cut = [i for i, state in enumerate(states) if state is not None and state.in_answer
               and not any(token in self.stop_ids for token in new_tokens[i])]
        if cut:
            extra = max(states[i].remaining_tokens() for i in cut)  # type: ignore[union-attr]
            more = self._generate_rows([list(rows[i]) + new_tokens[i] for i in cut],
                                       replace(params, max_new_tokens=extra), [states[i] for i in cut], fresh=False)
            for i, tokens in zip(cut, more):
                new_tokens[i] = new_tokens[i] + tokens
        heads = [i for i, state in enumerate(states) if state is not None and state.needs_head]
        if not heads:
            return
        prompts = [list(rows[i]) + self._until_stop(new_tokens[i]) for i in heads]
        scores = self.label_scores(prompts, [states[i].tokens for i in heads])  # type: ignore[union-attr]
        for i, row_scores in zip(heads, scores):
            state = states[i]
            assert state is not None
            state.head_scores = row_scores
            order = head_ranking(row_scores, state.tokens.labels)
            new_tokens[i] = self._until_stop(new_tokens[i]) + state.tokens.answer_tokens(order)

    def _until_stop(self, tokens: list[int]) -> list[int]:
        stop = next((k for k, token in enumerate(tokens) if token in self.stop_ids), len(tokens))
        return tokens[:stop]

    @torch.inference_mode()
    def label_scores(self, rows: Sequence[list[int]], label_tokens: Sequence[LabelTokens]) -> list[dict[str, float]]:
        """Every label's log-probability of coming next after each row (a prompt ending in
        ``<answer>``): bare and spaced spellings together, multi-token labels token by token."""
        out: list[dict[str, float]] = [{} for _ in rows]
        single = [i for i, t in enumerate(label_tokens) if t.single_token]
        for start in range(0, len(single), self.batch_size):
            chunk = single[start : start + self.batch_size]
            logits = self._forward_logits([rows[i] for i in chunk], keep=1)[:, -1]
            for i, row_logits in zip(chunk, torch.log_softmax(logits.float(), dim=-1)):
                variants = label_tokens[i].variants
                out[i] = {label: float(torch.logsumexp(row_logits[[seq[0] for seq in seqs]], dim=0))
                          for label, seqs in variants.items()}
        for i, tokens in enumerate(label_tokens):
            if not tokens.single_token:
                out[i] = self._sequence_scores(rows[i], tokens)
        return out

    def _sequence_scores(self, row: list[int], tokens: LabelTokens) -> dict[str, float]:
        """Multi-token labels: one forward pass over the row's KV (shared prefix) and every spelling."""
        spellings = [(label, seq) for label, seqs in tokens.variants.items() for seq in seqs]
        width = max(len(seq) for _, seq in spellings)
        logits = self._forward_logits([list(row) + list(seq) for _, seq in spellings], keep=width + 1,
                                      prefix_limit=len(row) - 1)
        logp = torch.log_softmax(logits.float(), dim=-1)
        per_label: dict[str, list[torch.Tensor]] = {}
        for k, (label, seq) in enumerate(spellings):
            # logits[-(n+1) + j] predicts token j of a spelling of n tokens (right-aligned rows)
            n = len(seq)
            total = sum(logp[k, logp.shape[1] - n - 1 + j, token] for j, token in enumerate(seq))
            per_label.setdefault(label, []).append(torch.as_tensor(total))
        return {label: float(torch.logsumexp(torch.stack(values), dim=0)) for label, values in per_label.items()}

    def _forward_logits(self, rows: Sequence[list[int]], keep: int, prefix_limit: int | None = None) -> torch.Tensor:
        """The last ``keep`` positions' logits of every row, in one forward pass (shared prefix reused)."""
        from transformers import DynamicCache

        prefix_len, prefix_kv = self._prefix_for(rows, limit=prefix_limit)
        input_ids, mask = self._layout(rows, prefix_len)
        batch = len(rows)
        cache = DynamicCache() if prefix_kv is None else DynamicCache(ddp_cache_data=[
            (k[:, :, :prefix_len].expand(batch, -1, -1, -1), v[:, :, :prefix_len].expand(batch, -1, -1, -1))
            for k, v in prefix_kv
        ])
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        output = self.model(input_ids=input_ids[:, prefix_len:], attention_mask=mask,
                            position_ids=positions[:, prefix_len:], past_key_values=cache, use_cache=True,
                            logits_to_keep=keep)
        return output.logits[:, -keep:]

    def clear_prefix_cache(self) -> None:
        self._prefixes.clear()

    @property
    def cached_prefixes(self) -> int:
        """How many shared prompt prefixes (with their KV) are stored for reuse."""
        return len(self._prefixes)

    def _new_cache(self, batch: int, max_len: int, prefix_len: int, prefix_kv):
        """A KV cache for one generate call, holding the shared prefix in every row if given.

        Static (preallocated, written in place) by default: a growing cache re-copies every
        row's whole KV at each decoding step, which was 58% of a batch-16 decoding step on CPU.
        """
        from transformers import DynamicCache, StaticCache

        if self.static_cache:
            cache = StaticCache(config=self.model.config, max_cache_len=max_len)
            if prefix_kv is not None:
                for layer, (keys, values) in zip(cache.layers, prefix_kv):
                    layer.update(keys[:, :, :prefix_len].expand(batch, -1, -1, -1),
                                 values[:, :, :prefix_len].expand(batch, -1, -1, -1))
            return cache
        if prefix_kv is None:
            return None
        return DynamicCache(ddp_cache_data=[
            (k[:, :, :prefix_len].expand(batch, -1, -1, -1), v[:, :, :prefix_len].expand(batch, -1, -1, -1))
            for k, v in prefix_kv
        ])

    # -- internals -------------------------------------------------------------------------------

    def _generation_config(self, params: SamplingParams):
        from transformers import GenerationConfig

        options = {
            "max_new_tokens": params.max_new_tokens,
            "do_sample": not params.greedy,
            "eos_token_id": self.stop_ids,
            "pad_token_id": self.pad_id,
            "use_cache": True,
        }
        if not params.greedy:
            options.update(temperature=params.temperature, top_p=params.top_p, top_k=0)
        return GenerationConfig(**options)

    def _finish(self, prompt: list[int], tokens: list[int], seconds: float,
                state: AnswerState | None = None) -> Generation:
        stop_at = next((i for i, token in enumerate(tokens) if token in self.stop_ids), None)
        kept = tokens if stop_at is None else tokens[:stop_at]
        completion = len(tokens) if stop_at is None else stop_at + 1
        self.stats["prompt_tokens"] += len(prompt)
        self.stats["completion_tokens"] += completion
        return Generation(
            text=self.tokenizer.decode(kept, skip_special_tokens=False),
            prompt_tokens=len(prompt),
            completion_tokens=completion,
            seconds=seconds,
            finish_reason="length" if stop_at is None else "stop",
            head_scores=state.head_scores if state is not None else None,
        )

    def _layout(self, rows: Sequence[list[int]], prefix_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``[prefix][padding][own tokens]`` per row (plain left padding when ``prefix_len`` is 0)."""
        width = max(len(row) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            own = row[prefix_len:]
            input_ids[i, :prefix_len] = torch.tensor(row[:prefix_len], dtype=torch.long)
            mask[i, :prefix_len] = 1
            input_ids[i, width - len(own) :] = torch.tensor(own, dtype=torch.long)
            mask[i, width - len(own) :] = 1
        device = self.model.device
        return input_ids.to(device), mask.to(device)

    def _prefix_for(self, rows: Sequence[list[int]], limit: int | None = None):
        """(length, per-layer KV) of a cached prefix shared by all ``rows`` (at most ``limit``
        tokens), or (0, None)."""
        if not self.prefix_cache:
            return 0, None
        shared = _common_prefix(rows)
        shared = shared[: min(len(row) for row in rows) - 1]  # every row keeps a token to prefill
        if limit is not None:
            shared = shared[: max(limit, 0)]
        best_key, best_len = None, 0
        for key in self._prefixes:
            length = len(_common_prefix([key, shared]))
            if length > best_len:
                best_key, best_len = key, length
        gain = len(shared) - best_len
        if len(rows) > 1 and gain >= self.min_prefix_tokens:
            kv = self._compute_prefix(shared, best_key, best_len)
            self._prefixes[tuple(shared)] = kv
            while len(self._prefixes) > self.max_cached_prefixes:
                self._prefixes.popitem(last=False)
            return len(shared), kv
        if best_key is None or best_len < self.min_prefix_tokens:
            return 0, None
        self._prefixes.move_to_end(best_key)
        return best_len, self._prefixes[best_key]

    def _compute_prefix(self, tokens: list[int], base_key, base_len: int):
        """KV of ``tokens``, extending the cached ``base_key`` prefix when it helps."""
        from transformers import DynamicCache

        cache = None
        start = 0
        if base_key is not None and base_len >= self.min_prefix_tokens:
            cache = DynamicCache(
                ddp_cache_data=[(k[:, :, :base_len], v[:, :, :base_len]) for k, v in self._prefixes[base_key]]
            )
            start = base_len
        ids = torch.tensor([tokens[start:]], dtype=torch.long, device=self.model.device)
        out = self.model(input_ids=ids, past_key_values=cache if cache is not None else DynamicCache(), use_cache=True)
        return [(layer.keys, layer.values) for layer in out.past_key_values.layers]


def _common_prefix(rows: Sequence[Sequence[int]]) -> list[int]:
    first = list(rows[0])
    length = min(len(row) for row in rows)
    for i in range(length):
        token = first[i]
        if any(row[i] != token for row in rows[1:]):
            return first[:i]
    return first[:length]


def _full_attention_only(config) -> bool:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text, "sliding_window", None) and getattr(text, "use_sliding_window", True):
        return False
    layer_types = getattr(text, "layer_types", None)
    return not layer_types or all(kind == "full_attention" for kind in layer_types)
