"""Per-conversation KV cache: rows the backend already processed, found again by token prefix.

An agent conversation comes back every turn as a longer prompt: the previous prompt, the
assistant turn the model generated, the tool results and the next assistant header. The
store keeps, for every processed row, its token ids (prompt plus the generated tokens whose
KV exists) and that KV. ``match(row)`` returns the entry sharing the longest token prefix
with a new prompt and that prefix's length: only that much is reused, because the chat
template may re-render the previous assistant turn differently from what the model generated
(tool calls are re-serialised, text is stripped), so the ids can part before the end.

Memory: an entry owns its KV only from ``base_len`` on; the tokens before come from a shared
base (the shared system prompt and tool schemas prefix, one KV for every conversation),
counted once. The store is bounded by entries (least recently used conversation first) and
by bytes. A row that continues a conversation (it holds the entry's whole prompt) replaces
its entry; a row that only shares the start of another conversation reuses it, and both stay.
With more conversations in flight than fit, plain least-recently-used eviction fails: the
agent loop visits every conversation in turn, so it would evict each one just before it comes
back. ``protect(prompts)`` (the backend calls it per ``generate`` call) shields the entries the
call's prompts continue, and their successors, so a fixed share of the conversations stays
cached; the others are prefilled in full. SmolLM2-135M keeps 23 KB of KV per token in
bfloat16 (46 KB in float32): 32 agent conversations of 2,500 tokens took 1.8 GB.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

# Conversations a store holds at least; without a fixed bound it grows to every call's
# conversation count (``protect``), within its bytes.
MIN_CACHED_CONVERSATIONS = 64

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys and values, (1, heads, tokens, head_dim)
Piece = tuple[KV, int]  # the first ``n`` positions of a KV


def kv_nbytes(kv: KV) -> int:
    return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kv)


@dataclass(eq=False)
class Entry:
    """One processed row: ``tokens`` and their KV, ``base`` (shared, not owned) then ``tail``."""

    tokens: np.ndarray  # int64 token ids
    base: KV | None  # KV of at least ``base_len`` tokens, shared with other entries
    base_len: int
    tail: KV  # KV of tokens[base_len:]
    prompt_len: int = 0  # tokens[:prompt_len] were the prompt, the rest the model's reply
    nbytes: int = field(init=False)  # bytes this entry owns (its tail; the base is shared)

    def __post_init__(self) -> None:
        self.nbytes = kv_nbytes(self.tail)

    def __len__(self) -> int:
        return len(self.tokens)

    def continued_by(self, reused: int) -> bool:
        """Whether a row reusing ``reused`` of these tokens continues this conversation: it holds
        the whole prompt (the reply may be re-rendered differently). Another conversation
        shares only the start of the prompt (system prompt, tool schemas)."""
        return reused >= self.prompt_len

    def pieces(self, length: int) -> list[Piece]:
        """The KV of the first ``length`` tokens as consecutive pieces."""
        head = min(self.base_len, length)
        pieces: list[Piece] = [(self.base, head)] if self.base is not None and head else []
        if length > self.base_len:
            pieces.append((self.tail, length - self.base_len))
        return pieces


def common_prefix_length(a: np.ndarray, b: np.ndarray, limit: int | None = None) -> int:
    """How many leading ids ``a`` and ``b`` share (at most ``limit``)."""
    n = min(len(a), len(b), len(a) if limit is None else limit)
    if n <= 0:
        return 0
    differ = a[:n] != b[:n]
    return int(differ.argmax()) if differ.any() else n


class ConversationCache:
    """A bounded store of :class:`Entry` by token prefix (LRU by conversation, and by bytes)."""

    def __init__(self, max_conversations: int | None = None, max_bytes: int = 8 * 2**30):
        self.grows = max_conversations is None  # the bound rises to every protected call's row count
        self.max_conversations = max(1, max_conversations or MIN_CACHED_CONVERSATIONS)
        self.max_bytes = max_bytes
        self._entries: OrderedDict[int, Entry] = OrderedDict()  # id(entry) -> entry, oldest first
        self._protected: set[int] = set()  # ids of entries evicted only when nothing else is left
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[Entry]:
        return iter(list(self._entries.values()))

    @property
    def nbytes(self) -> int:
        """Bytes held: every entry's tail plus each distinct base once."""
        bases = {id(entry.base): entry.base for entry in self._entries.values() if entry.base is not None}
        return sum(entry.nbytes for entry in self._entries.values()) + sum(kv_nbytes(b) for b in bases.values())

    def match(self, row: Sequence[int] | np.ndarray, limit: int) -> tuple[Entry | None, int]:
        """The entry sharing the longest prefix (at most ``limit`` tokens) with ``row``, and
        that length; (None, 0) when none shares a token. The entry becomes the most recent."""
        ids = np.asarray(row, dtype=np.int64)
        best, best_len = None, 0
        for entry in self._entries.values():
            if len(entry) and len(ids) and entry.tokens[0] == ids[0]:
                length = common_prefix_length(entry.tokens, ids, limit)
                if length > best_len:
                    best, best_len = entry, length
        if best is not None:
            self._entries.move_to_end(id(best))
        return best, best_len

    def protect(self, rows: Sequence[Sequence[int]]) -> None:
        """Shield from eviction, until ``release``, the entries that ``rows`` continue (their
        whole prompt is in the row) and the entries that will replace them. A growing store first
        raises its bound to the call's row count: every one of them comes back next turn."""
        if self.grows:
            self.max_conversations = max(self.max_conversations, len(rows))
        for row in rows:
            entry, length = self.match(row, len(row) - 1)
            if entry is not None and entry.continued_by(length):
                self._protected.add(id(entry))

    def release(self) -> None:
        self._protected.clear()

    def add(self, entry: Entry, replaces: Entry | None = None) -> None:
        """Store ``entry`` (the newest); drop ``replaces`` and every entry whose tokens are a
        prefix of it (the new entry serves them as well), then evict down to the bounds: the
        least recently used unprotected entry first."""
        if replaces is not None:
            self._entries.pop(id(replaces), None)
            if id(replaces) in self._protected:
                self._protected.add(id(entry))
        for old in list(self._entries.values()):
            if len(old) <= len(entry) and common_prefix_length(old.tokens, entry.tokens) == len(old):
                del self._entries[id(old)]
        self._entries[id(entry)] = entry
        while self._entries and (len(self._entries) > self.max_conversations or self.nbytes > self.max_bytes):
            victim = next((key for key in self._entries if key not in self._protected), next(iter(self._entries)))
            del self._entries[victim]
            self.evicted += 1

    def clear(self) -> None:
        self._entries.clear()
        self._protected.clear()
