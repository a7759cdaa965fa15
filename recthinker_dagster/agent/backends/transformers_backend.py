"""Local ``transformers`` backend: batched generation, with the shared prompt prefix cached.

One ``generate`` call serves a whole batch: prompts are rendered with the chat template,
sorted by length, split into chunks of ``batch_size`` and each chunk is generated in one
``model.generate`` call (left padding, attention mask, stop on ``<|im_end|>``).

Shared-prefix KV cache: every agent prompt starts with the same system prompt and tool schemas
(hundreds of tokens). The backend computes the KV cache of the longest token prefix a chunk
shares once, keeps it (a small LRU across calls, so every later turn reuses it), and prefills
only the rest.

Conversation KV cache (``conversation_cache=True``): each turn of the agent loop sends every
conversation again, grown by the assistant turn the model just wrote and the tool results.
After each generate pass the backend keeps every row's token ids (prompt plus the generated
tokens whose KV exists) and their KV (``conversation_cache.py``: LRU by conversation and
bounded in bytes, the shared prefix stored once); the next prompt that extends a kept row
reuses its KV up to their longest common token prefix (the re-rendered assistant turn may
tokenize differently from what the model generated) and prefills only the rest: the tool
results and the next assistant header. ``stats`` counts ``conversation_tokens_reused``,
``prefix_tokens_reused`` and ``prefilled_tokens``. The store holds as many conversations as
the largest ``generate`` call brought (at least 64; ``max_cached_conversations`` fixes the
bound instead) within ``conversation_cache_bytes`` (8 GiB): the evaluation runs 128
conversations per call, and a store of 64 kept only half of them, so the other half was
prefilled in full every turn.

Layout: row ``i`` reuses ``c_i`` cached tokens and prefills ``n_i``; with ``P = max c`` and
``N = max n`` the batch reads ``[cached c_i][padding][own n_i]`` over ``P + N`` columns. Each
row's cached KV is copied into columns ``[0, c_i)`` of the batch's cache (zeros after it), the
attention mask hides the padding and positions come from the mask, so every row sees exactly
its own tokens at their own positions: the result equals plain left padding token for token
in float32 (``tests/test_backends.py``, ``tests/test_conversation_cache.py``). A row reuses
at most ``len - N`` tokens: the ``N`` prefill columns are computed for every row anyway, so
the batch is only as wide as its longest row. Both caches apply to models with full attention
only (no sliding windows).

KV cache: a preallocated cache per generate call (``static_cache=True``). The default growing
cache re-copies every row's whole KV at each decoding step (``torch.cat``): 58% of a batch-16
decoding step at 1,800 tokens on CPU; a static cache cut that step from 0.47 s to 0.19 s. For
full-attention models the buffer is written in place but attention reads only its filled
positions (``PreallocatedLayer``): ``StaticCache`` reads all of them at every step, the
``max_new_tokens`` not generated yet included, and decoding attention is memory-bound
(two thirds of a batch-16 decoding step at 1,500 tokens on a 2-core CPU).

Stragglers (``split_stragglers=True``, opt-in, with the conversation cache): ``model.generate``
keeps decoding every row until the last one stops, so rows that finished early still cost a
decoding step each (agent turns end anywhere between 40 and 256 tokens). Once half of a batch
of at least ``min_split_rows`` rows has stopped, the pass ends (``HalfStopped``) and the
unfinished rows continue alone, as a new pass over their kept KV (one token to prefill per
row), with the same answer states and the rest of the token budget; the continuation may
split again. Greedy float32 output is unchanged token for token. Off by default until its
gain is measured on a quiet machine: ``scripts/benchmark_inference.py --modes c,d`` compares.

``dtype="auto"``: bfloat16 on GPUs that support it and on CPUs with native bf16 (AVX512-BF16
or AMX), float32 elsewhere. On a 2-core AMX Xeon, batched bf16 ran 1.75-1.85x faster than
float32; single-stream decoding was about even (``scripts/benchmark_inference.py``). Greedy
bf16 output is not batch-invariant (about half the texts differ from one-at-a-time runs);
float32 output is identical token for token.

Answers: with ``answers=[AnswerSpec, ...]`` every ``<answer>`` the model opens is decoded under
:class:`~recthinker_dagster.agent.backends.constrained.AnswerConstraint` (a permutation of the
labels, or the label head's ranking in ``logits`` mode, its first label sampled when decoding
samples). A row that hits ``max_new_tokens`` inside its answer is continued (same state, only
the tokens the answer still needs), so a constrained answer is never cut off. ``rank_labels``
is the label head on its own: one forward pass over a conversation plus ``<answer>``.

Attention: on CPU, every decoding step runs SDPA with a mask, also where a batch has no
padding (``attention.py``: without one, ``transformers`` takes SDPA's grouped-query path, several
times slower there).

Threads: ``from_pretrained`` sets torch threads to the available cores. On a machine shared
with other busy processes, run with ``OMP_WAIT_POLICY=PASSIVE`` (set before Python starts):
spinning OpenMP threads that lose their core made 2-thread decoding up to 10x slower.
"""

from __future__ import annotations

import functools
import os
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from recthinker_dagster.agent.backends.attention import masked_decoding
from recthinker_dagster.agent.backends.base import AnswerSpec, Generation, SamplingParams, head_ranking, tools_for
from recthinker_dagster.agent.backends.chat_template import (
    ensure_tool_chat_template,
    render_prompt,
    stop_token_ids,
    turn_end_token_id,
)
from recthinker_dagster.agent.backends.constrained import ANSWER_OPEN, AnswerConstraint, AnswerState, LabelTokens
from recthinker_dagster.agent.backends.conversation_cache import KV, ConversationCache, Entry, Piece
from recthinker_dagster.agent.backends.sampled_logprobs import SampledLogprobs
from recthinker_dagster.agent.labels import label_token_problems
from recthinker_dagster.agent.transcript import UNKNOWN_LOGPROB, environment_text

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


@dataclass
class RowPlan:
    """Where one row's reused KV comes from: its first ``reused`` tokens, as consecutive pieces."""

    reused: int = 0
    pieces: list[Piece] = field(default_factory=list)
    base: KV | None = None  # the shared prefix the row's stored entry refers to
    base_len: int = 0
    source: Entry | None = None  # the kept row reused
    continues: bool = False  # the row continues that conversation: its new entry replaces ``source``

    @classmethod
    def from_entry(cls, entry: Entry, length: int) -> RowPlan:
        base_len = min(entry.base_len, length) if entry.base is not None else 0
        return cls(length, entry.pieces(length), entry.base, base_len, entry, entry.continued_by(length))

    @classmethod
    def from_prefix(cls, kv: KV, length: int) -> RowPlan:
        return cls(length, [(kv, length)], kv, length)

    def trimmed(self, length: int) -> RowPlan:
        """The same source, reusing only its first ``length`` tokens."""
        if length >= self.reused:
            return self
        pieces, left = [], length
        for kv, count in self.pieces:
            if left > 0:
                pieces.append((kv, min(count, left)))
                left -= count
        base_len = min(self.base_len, length)
        return RowPlan(length, pieces, self.base if base_len else None, base_len, self.source, self.continues)


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class TransformersBackend:
    """Generate with an in-process model; ``from_pretrained`` loads one from a folder."""

    constrains_answers = True  # ``generate`` takes ``answers=`` (see the module docstring)
    tracks_tokens = True  # ``generate`` takes ``prompt_ids=`` and returns the sampled ids and log-probs

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
        conversation_cache: bool = True,
        max_cached_conversations: int | None = None,
        conversation_cache_bytes: int = 8 * 2**30,
        static_cache: bool = True,
        split_stragglers: bool = False,
        min_split_rows: int = 8,
        chat_template: str = "auto",
    ):
        self.model = model.eval()
        masked_decoding(model)  # CPU: a mask in every decoding step (attention.py)
        self.tokenizer = ensure_tool_chat_template(tokenizer, chat_template)
        self.name = name or getattr(model.config, "_name_or_path", "") or type(model).__name__
        self.batch_size = max(1, batch_size)
        self.prefix_cache = prefix_cache and _full_attention_only(model.config)
        self.min_prefix_tokens = min_prefix_tokens
        self.max_cached_prefixes = max_cached_prefixes
        self.conversations = (ConversationCache(max_cached_conversations, conversation_cache_bytes)
                              if conversation_cache and _full_attention_only(model.config) else None)
        self.static_cache = static_cache
        self.split_stragglers = split_stragglers and self.conversations is not None  # continuing needs kept KV
        self.min_split_rows = max(2, min_split_rows)
        self.max_context_tokens = getattr(model.config.get_text_config(), "max_position_embeddings", None)
        self.stop_ids = stop_token_ids(tokenizer)
        self.turn_end_id = turn_end_token_id(self.tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[0]
        self._prefixes: OrderedDict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]] = OrderedDict()
        self._label_tokens: dict[tuple[str, ...], LabelTokens] = {}
        # prompt positions of every generate pass: reused from a cache, or prefilled (padding apart)
        self.stats = {"prompt_tokens": 0, "prefix_tokens_reused": 0, "conversation_tokens_reused": 0,
                      "prefilled_tokens": 0, "completion_tokens": 0, "padded_tokens": 0, "straggler_splits": 0}

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
        prompt_ids: Sequence[list[int] | None] | None = None,
    ) -> list[Generation]:
        """``prompt_ids``: a conversation's exact tokens, used instead of rendering its messages."""
        prompts = self._prompts(conversations, tools, prompt_ids)
        specs = list(answers) if answers is not None else [None] * len(conversations)
        results: list[Generation | None] = [None] * len(prompts)
        limit = self.max_context_tokens
        for i, prompt in enumerate(prompts):
            if limit and len(prompt) + params.max_new_tokens > limit:
                results[i] = Generation("", prompt_tokens=len(prompt), finish_reason="error", error=(
                    f"context overflow: {len(prompt)} prompt + {params.max_new_tokens} new tokens > {limit}"))
        todo = [i for i in range(len(prompts)) if results[i] is None]
        order = sorted(todo, key=lambda i: len(prompts[i]), reverse=True)
        if self.conversations is not None:  # the rows of later chunks must survive the earlier chunks
            self.conversations.protect([prompts[i] for i in todo])
        try:
            for start in range(0, len(order), self.batch_size):
                chunk = order[start : start + self.batch_size]
                generations = self.generate_ids([prompts[i] for i in chunk], params, [specs[i] for i in chunk])
                for index, generation in zip(chunk, generations):
                    results[index] = generation
        finally:
            if self.conversations is not None:
                self.conversations.release()
        return results  # type: ignore[return-value]

    def labels_fit(self, labels: Sequence[str]) -> bool:
        """Whether every label is one token of this tokenizer (``agent/labels.py``)."""
        return not label_token_problems(self.tokenizer, labels)

    def rank_labels(
        self,
        conversations: Sequence[list[dict]],
        tools: Sequence[list[dict] | None] | None,
        labels: Sequence[Sequence[str]],
        prompt_ids: Sequence[list[int] | None] | None = None,
    ) -> list[dict[str, float]]:
        """The label head: each conversation plus an assistant turn opened with ``<answer>``, one
        forward pass, and every label's log-probability at the next position."""
        opener = self.text_ids(ANSWER_OPEN)
        rows = [row + opener for row in self._prompts(conversations, tools, prompt_ids)]
        return self.label_scores(rows, [self.label_tokens(label_set) for label_set in labels])

    def environment_ids(self, messages: Sequence[dict], tools: Sequence[dict] | None, assistant_index: int,
                        stopped: bool) -> list[int]:
        """The tokens between the sampled assistant turn ``messages[assistant_index]`` and the
        next generation prompt: the end token when the turn was cut off, then the template's
        rendering of the messages after it and the next assistant header."""
        end = self.turn_end_id
        render = functools.partial(render_prompt, self.tokenizer)
        text = environment_text(render, messages, tools, assistant_index, self.tokenizer.decode([end]))
        return ([] if stopped else [end]) + self.text_ids(text)

    def head_answer_ids(self, labels: Sequence[str], order: Sequence[str]) -> list[int]:
        """The tokens of the forced head's turn: ``<answer>``, the labels in ``order``, the close."""
        return self.text_ids(ANSWER_OPEN) + self.label_tokens(labels).answer_tokens(order)

    def text_ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _prompts(self, conversations, tools, prompt_ids) -> list[list[int]]:
        tool_lists = tools_for(tools, len(conversations))
        given = list(prompt_ids) if prompt_ids is not None else [None] * len(conversations)
        if len(given) != len(conversations):
            raise ValueError(f"got {len(given)} prompt_ids for {len(conversations)} conversations")
        return [list(ids) if ids is not None else self.encode(messages, tool_list)
                for messages, tool_list, ids in zip(conversations, tool_lists, given)]

    def label_tokens(self, labels: Sequence[str]) -> LabelTokens:
        key = tuple(labels)
        if key not in self._label_tokens:
            self._label_tokens[key] = LabelTokens.build(self.tokenizer, key, self.stop_ids[0])
        return self._label_tokens[key]

    # -- pieces, public for benchmarks and tests -----------------------------------------------

    def encode(self, messages: Sequence[dict], tools: Sequence[dict] | None = None) -> list[int]:
        return self.text_ids(render_prompt(self.tokenizer, messages, tools))

    @torch.inference_mode()
    def generate_ids(self, rows: Sequence[list[int]], params: SamplingParams,
                     answers: Sequence[AnswerSpec | None] | None = None) -> list[Generation]:
        """One ``model.generate`` call for prompts given as token ids (plus, with ``answers``, the
        continuation of answers cut off by ``max_new_tokens`` and the head of multi-token labels)."""
        started = time.perf_counter()
        if not params.greedy and params.seed is not None:
            torch.manual_seed(params.seed)
        states = self._answer_states(answers, len(rows), sample_ranking=not params.greedy)
        new_tokens, logprobs = self._generate_rows(rows, params, states, fresh=True)
        if states is not None:
            self._finish_answers(rows, new_tokens, logprobs, params, states)
        seconds = time.perf_counter() - started
        return [self._finish(row, tokens, row_logprobs, seconds, states[i] if states else None)
                for i, (row, tokens, row_logprobs) in enumerate(zip(rows, new_tokens, logprobs))]

    def _answer_states(self, answers, n: int, *, sample_ranking: bool) -> list[AnswerState | None] | None:
        if answers is None or not any(spec is not None for spec in answers):
            return None
        if len(answers) != n:
            raise ValueError(f"got {len(answers)} answer specs for {n} prompts")
        return [None if spec is None else
                AnswerState(self.label_tokens(spec.labels), spec.mode, sample_ranking=sample_ranking)
                for spec in answers]

    def _generate_rows(self, rows: Sequence[list[int]], params: SamplingParams,
                       states: Sequence[AnswerState | None] | None, *,
                       fresh: bool) -> tuple[list[list[int]], list[list[float]]]:
        """The new tokens of every row and their sampled log-probs (``model.generate`` calls;
        padding after a stop included): one call, plus the continuation of its unfinished rows
        when it ended early on half of them stopping (see the module docstring)."""
        from transformers import LogitsProcessorList, StoppingCriteriaList

        plans = self._plan(rows)
        input_ids, attention_mask = self._layout(rows, plans)
        width = input_ids.shape[1]
        cache = self._new_cache(plans, width + params.max_new_tokens)
        processors = LogitsProcessorList()
        if states is not None:
            processors.append(AnswerConstraint(self.tokenizer, states, self.stop_ids, fresh=fresh,
                                               answer_scale=params.answer_scale))
        recorder = SampledLogprobs(params.temperature)
        processors.append(recorder)
        split = self.split_stragglers and len(rows) >= self.min_split_rows
        output = self.model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            # explicit: generate derives them from the mask only when the model's forward names
            # ``position_ids``, which a wrapped forward (GRPO's scored head) does not
            position_ids=mask_positions(attention_mask),
            past_key_values=cache,
            generation_config=self._generation_config(params),
            logits_processor=processors,
            stopping_criteria=StoppingCriteriaList([HalfStopped(self.stop_ids)] if split else []),
        )
        new_tokens = output[:, width:].tolist()
        logprobs = recorder.finish(output[:, -1]) if new_tokens and new_tokens[0] else [[] for _ in rows]
        self._count(rows, plans)
        self._remember(rows, plans, new_tokens, cache, width)
        steps = len(new_tokens[0]) if new_tokens else 0
        unfinished = [i for i, tokens in enumerate(new_tokens) if not any(token in self.stop_ids for token in tokens)]
        if split and unfinished and steps < params.max_new_tokens:
            self.stats["straggler_splits"] += 1
            more, more_logprobs = self._generate_rows(
                [list(rows[i]) + new_tokens[i] for i in unfinished],
                replace(params, max_new_tokens=params.max_new_tokens - steps),
                None if states is None else [states[i] for i in unfinished], fresh=False)
            for i, tokens, row_logprobs in zip(unfinished, more, more_logprobs):
                new_tokens[i] = new_tokens[i] + tokens
                logprobs[i] = logprobs[i] + row_logprobs
        return new_tokens, logprobs

    def _finish_answers(self, rows: Sequence[list[int]], new_tokens: list[list[int]], logprobs: list[list[float]],
                        params: SamplingParams, states: Sequence[AnswerState | None]) -> None:
        """Continue answers cut off by the token limit, then rank multi-token labels by the head."""
        cut = [i for i, state in enumerate(states) if state is not None and state.in_answer
               and not any(token in self.stop_ids for token in new_tokens[i])]
        if cut:
            extra = max(states[i].remaining_tokens() for i in cut)  # type: ignore[union-attr]
            more, more_logprobs = self._generate_rows([list(rows[i]) + new_tokens[i] for i in cut],
                                                      replace(params, max_new_tokens=extra), [states[i] for i in cut],
                                                      fresh=False)
            for i, tokens, row_logprobs in zip(cut, more, more_logprobs):
                new_tokens[i] = new_tokens[i] + tokens
                logprobs[i] = logprobs[i] + row_logprobs
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
            kept = self._until_stop(new_tokens[i])
            written = state.tokens.answer_tokens(order)  # by the head, not sampled token by token
            new_tokens[i] = kept + written
            logprobs[i] = logprobs[i][: len(kept)] + [UNKNOWN_LOGPROB] * len(written)

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
        plans = self._plan(rows, limit=prefix_limit)
        input_ids, mask = self._layout(rows, plans)
        reused = max(plan.reused for plan in plans)
        positions = mask_positions(mask)
        output = self.model(input_ids=input_ids[:, reused:], attention_mask=mask,
                            position_ids=positions[:, reused:], past_key_values=self._new_cache(plans),
                            use_cache=True, logits_to_keep=keep)
        return output.logits[:, -keep:]

    def clear_prefix_cache(self) -> None:
        self._prefixes.clear()

    def clear_conversation_cache(self) -> None:
        if self.conversations is not None:
            self.conversations.clear()

    @property
    def cached_prefixes(self) -> int:
        """How many shared prompt prefixes (with their KV) are stored for reuse."""
        return len(self._prefixes)

    def _new_cache(self, plans: Sequence[RowPlan], max_len: int | None = None):
        """A KV cache holding every row's reused KV in columns ``[0, c_i)`` (zeros up to the
        longest): preallocated for ``max_len`` positions when given and ``static_cache`` is on
        (see the module docstring), else growing."""
        from transformers import DynamicCache, StaticCache

        config = self.model.config
        preallocated = self.static_cache and max_len is not None and _full_attention_only(config)
        if preallocated and max_len is not None:
            cache = preallocated_cache(config, max_len)
        elif self.static_cache and max_len is not None:
            cache = StaticCache(config=self.model.config, max_cache_len=max_len)
        else:
            cache = DynamicCache(config=self.model.config)
        reused = max(plan.reused for plan in plans)
        if not reused:
            return cache
        for layer, (ref_k, ref_v) in enumerate(next(kv for plan in plans for kv, _ in plan.pieces)):
            if preallocated:  # written straight into the layer's buffer
                keys, values = cache.layers[layer].reserve(ref_k, ref_v, len(plans), reused)
            else:
                keys = ref_k.new_empty((len(plans), ref_k.shape[1], reused, ref_k.shape[3]))
                values = ref_v.new_empty((len(plans), ref_v.shape[1], reused, ref_v.shape[3]))
            self._fill(plans, layer, keys, values)
            if not preallocated:
                cache.update(keys, values, layer)
        return cache

    @staticmethod
    def _fill(plans: Sequence[RowPlan], layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write each row's reused keys and values of ``layer`` into ``(rows, heads, width, dim)``
        tensors, zeros after them (masked positions must hold finite numbers: 0 * NaN is NaN)."""
        for i, plan in enumerate(plans):
            start = 0
            for kv, count in plan.pieces:
                k, v = kv[layer]
                keys[i, :, start : start + count] = k[0, :, :count]
                values[i, :, start : start + count] = v[0, :, :count]
                start += count
            keys[i, :, start:] = 0
            values[i, :, start:] = 0

    def _plan(self, rows: Sequence[list[int]], limit: int | None = None) -> list[RowPlan]:
        """Per row, the longest cached KV to reuse (at most ``limit`` tokens, and never the
        last token: its logits are needed): a kept conversation row, else the shared prefix."""
        caps = [len(row) - 1 if limit is None else max(min(len(row) - 1, limit), 0) for row in rows]
        plans = [RowPlan() for _ in rows]
        if self.conversations is not None:
            for i, (row, cap) in enumerate(zip(rows, caps)):
                entry, length = self.conversations.match(row, cap)
                if entry is not None:
                    plans[i] = RowPlan.from_entry(entry, length)
        fresh = [i for i, plan in enumerate(plans) if plan.reused < self.min_prefix_tokens]
        if fresh:
            prefix_len, prefix_kv = self._prefix_for([rows[i] for i in fresh], limit=limit)
            for i in fresh:
                if prefix_kv is not None and prefix_len > plans[i].reused:
                    plans[i] = RowPlan.from_prefix(prefix_kv, prefix_len)
        # Every row prefills the longest prefill's columns anyway: a row that reuses more than
        # it needs for that would only widen the batch (its extra cached tokens face padding)
        own = max(len(row) - plan.reused for row, plan in zip(rows, plans))
        return [plan.trimmed(max(0, len(row) - own)) for row, plan in zip(rows, plans)]

    def _count(self, rows: Sequence[list[int]], plans: Sequence[RowPlan]) -> None:
        own = [len(row) - plan.reused for row, plan in zip(rows, plans)]
        for plan in plans:
            # reusing another conversation's start is reusing the shared prefix
            key = "conversation_tokens_reused" if plan.continues else "prefix_tokens_reused"
            self.stats[key] += plan.reused
        self.stats["prefilled_tokens"] += sum(own)
        self.stats["padded_tokens"] += len(own) * max(own) - sum(own)

    def _remember(self, rows: Sequence[list[int]], plans: Sequence[RowPlan], new_tokens: list[list[int]],
                  cache, width: int) -> None:
        """Keep each row (prompt plus the generated tokens whose KV exists) and its KV for a
        later turn; it replaces the kept row of its conversation."""
        if self.conversations is None or not new_tokens:
            return
        steps = len(new_tokens[0])
        layers = [(layer.keys, layer.values) for layer in cache.layers]
        device = layers[0][0].device
        for i, (row, plan, tokens) in enumerate(zip(rows, plans, new_tokens)):
            fed = self._fed(tokens, steps)
            own = len(row) - plan.reused
            # the row's positions in the batch cache from base_len on: the rest of its cached
            # tokens, then its own tokens and the fed generated ones (right-aligned at ``width``)
            index = torch.cat([torch.arange(plan.base_len, plan.reused),
                               torch.arange(width - own, width + fed)]).to(device)
            tail = [(k[i : i + 1].index_select(2, index), v[i : i + 1].index_select(2, index)) for k, v in layers]
            ids = np.asarray(list(row) + tokens[:fed], dtype=np.int64)
            self.conversations.add(Entry(ids, plan.base, plan.base_len, tail, len(row)),
                                   replaces=plan.source if plan.continues else None)

    def _fed(self, tokens: list[int], steps: int) -> int:
        """How many generated tokens went through the model: all but the last step's, and
        none after a stop (later positions hold padding)."""
        stop = next((k for k, token in enumerate(tokens) if token in self.stop_ids), None)
        return max(0, steps - 1 if stop is None else min(stop + 1, steps - 1))

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

    def _finish(self, prompt: list[int], tokens: list[int], logprobs: list[float], seconds: float,
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
            prompt_ids=list(prompt),
            token_ids=tokens[:completion],
            logprobs=[round(float(value), 5) for value in logprobs[:completion]],
        )

    def _layout(self, rows: Sequence[list[int]], plans: Sequence[RowPlan]) -> tuple[torch.Tensor, torch.Tensor]:
        """``[cached c_i][padding][own tokens]`` per row over ``max c + max own`` columns (plain
        left padding when nothing is reused); the cached columns are in the cache already."""
        reused = max(plan.reused for plan in plans)
        width = reused + max(len(row) - plan.reused for row, plan in zip(rows, plans))
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (row, plan) in enumerate(zip(rows, plans)):
            own = row[plan.reused :]
            input_ids[i, : plan.reused] = torch.tensor(row[: plan.reused], dtype=torch.long)
            mask[i, : plan.reused] = 1
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


class HalfStopped:
    """A ``transformers`` stopping criterion that ends a batch's pass once half of its rows have
    emitted a stop token (the backend then continues the others on their own)."""

    def __init__(self, stop_ids: Sequence[int]):
        self.stop_ids = torch.tensor(sorted(set(stop_ids)))
        self.stopped: torch.Tensor | None = None  # per row: a stop token was emitted (sticky)

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        last = torch.isin(input_ids[:, -1], self.stop_ids.to(input_ids.device))
        self.stopped = last if self.stopped is None else self.stopped | last
        return torch.full_like(self.stopped, 2 * int(self.stopped.sum()) >= len(self.stopped))


def preallocated_cache(config, capacity: int):
    """A KV cache of ``PreallocatedLayer`` s holding up to ``capacity`` positions per row."""
    from transformers import Cache

    return Cache(layers=[_preallocated_layer_class()(capacity) for _ in range(config.get_text_config().num_hidden_layers)])


@functools.cache
def _preallocated_layer_class():
    """``PreallocatedLayer`` (defined on first use: ``transformers`` is imported lazily)."""
    from transformers.cache_utils import DynamicLayer

    class PreallocatedLayer(DynamicLayer):
        """A cache layer whose keys and values live in one buffer of ``capacity`` positions,
        written in place (no re-copy per step), of which attention sees only the filled part."""

        def __init__(self, capacity: int):
            super().__init__()
            self.capacity = capacity
            self.filled = 0

        def reserve(self, keys_like: torch.Tensor, values_like: torch.Tensor, batch: int,
                    width: int) -> tuple[torch.Tensor, torch.Tensor]:
            """Allocate the buffers (dtype, heads, dim of the given states) and return their first
            ``width`` positions, counted as filled: the caller writes them."""
            self.lazy_initialization(keys_like, values_like)
            # never read before written: attention sees only the filled part
            self.buffers = tuple(states.new_empty((batch, states.shape[1], self.capacity, states.shape[3]))
                                 for states in (keys_like, values_like))
            self.filled = width
            self.keys, self.values = self.buffers[0][:, :, :width], self.buffers[1][:, :, :width]
            return self.keys, self.values

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
            if not self.is_initialized:
                self.reserve(key_states, value_states, key_states.shape[0], 0)
            end = self.filled + key_states.shape[-2]
            self.buffers[0][:, :, self.filled : end] = key_states
            self.buffers[1][:, :, self.filled : end] = value_states
            self.filled = end
            self.keys, self.values = self.buffers[0][:, :, :end], self.buffers[1][:, :, :end]
            return self.keys, self.values

    return PreallocatedLayer


def mask_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Each column's position within its row: padding (mask 0) does not count, so a row's
    tokens after padding continue its cached ones."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


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
