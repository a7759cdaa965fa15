"""Answers that are valid by construction: a ``LogitsProcessor`` for the inside of ``<answer>``.

    tokens = LabelTokens.build(tokenizer, ("A", "B", "C"), stop_id)
    processor = AnswerConstraint(tokenizer, [AnswerState(tokens, "generate"), None, ...])  # one per row
    model.generate(..., logits_processor=LogitsProcessorList([processor]))

Outside an answer the model writes freely. Once the text it generated ends with ``<answer>``
(whatever tokens spelled it), each row follows a small grammar over token ids:

    label (separator label)* </answer> <stop>

where a label is one of the *unused* candidate labels, written bare (``A``) or with a leading
space (``" A"``), the separator is ``,`` and ``</answer>`` plus the stop token are forced
after the last label. Every other token gets ``-inf``, so the model still decides the order,
and sampling (temperature, top-p: applied after this processor) still works. The state is per
row, so batched decoding keeps working; rows that never open an answer are untouched.
Multi-token labels (``C17`` = ``C``, ``1``, ``7``) are walked token by token, through a
prefix test over the unused labels' token sequences.

``mode="logits"`` (the ranking head): at the position right after ``<answer>`` the label
tokens' log-probabilities order the labels (``head_scores``: per label, the log of the
probability of writing it next, bare or spaced). Greedy decoding forces that order out token
by token. Sampled decoding (``sample_ranking``, single-token labels) draws the ranking from the
same scores, label by label without replacement (Plackett–Luce): at every label position the
allowed ids are the unused labels' tokens, each carrying its label's head score, so the
sampler's temperature (or ``answer_scale``) and its log-prob record apply as to any token, and a
learner scores every draw from the one position the scores came from (``replay_answer``).
In ``generate`` mode the same scores are recorded (single-token labels) and the model goes on
to write its own order: a greedy rollout then gives both modes' answers, since the two modes
decode alike up to ``<answer>``. With multi-token labels a single position cannot score
every label: the row stops right after ``<answer>`` (``needs_head``) and the backend scores
the labels with one more forward pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
OUTSIDE, LABEL, SEPARATOR, CLOSE, STOP, DONE = "outside", "label", "separator", "close", "stop", "done"
TAIL_CHARS = 24


@dataclass(frozen=True)
class LabelTokens:
    """The token sequences of one candidate set in one tokenizer."""

    labels: tuple[str, ...]
    variants: dict[str, tuple[tuple[int, ...], ...]]  # label -> (bare ids, spaced ids), distinct
    separator: int
    close: tuple[int, ...]
    stop: int

    @property
    def single_token(self) -> bool:
        return all(len(seq) == 1 for seqs in self.variants.values() for seq in seqs)

    @classmethod
    def build(cls, tokenizer, labels: Sequence[str], stop: int) -> LabelTokens:
        def ids(text: str) -> tuple[int, ...]:
            return tuple(tokenizer.encode(text, add_special_tokens=False))

        separator = ids(",")
        if len(separator) != 1:
            raise ValueError(f"the answer separator ',' is {len(separator)} tokens in this tokenizer")
        variants = {label: tuple(dict.fromkeys((ids(label), ids(" " + label)))) for label in labels}
        return cls(tuple(labels), variants, separator[0], ids(ANSWER_CLOSE), stop)

    def answer_tokens(self, order: Sequence[str]) -> list[int]:
        """``A, C, B</answer><stop>`` for ``order``: bare first label, spaced after a separator."""
        tokens = list(self.variants[order[0]][0])
        for label in order[1:]:
            tokens += [self.separator, *self.variants[label][-1]]
        return tokens + list(self.close) + [self.stop]


@dataclass
class AnswerState:
    """One row's progress through its answer."""

    tokens: LabelTokens
    mode: str = "generate"
    phase: str = OUTSIDE
    used: list[str] = field(default_factory=list)
    partial: tuple[int, ...] = ()  # tokens of the label being written
    pending: str | None = None  # a complete label that a longer unused label also starts with
    close_at: int = 0
    queue: list[int] = field(default_factory=list)  # forced tokens (the head's ranking)
    head_scores: dict[str, float] | None = None
    needs_head: bool = False  # logits mode, multi-token labels: the backend ranks after generation
    sample_ranking: bool = False  # logits mode, sampled decoding: the ranking is drawn from the head (head_draw)
    tail: str = ""
    opened: bool = False

    @property
    def in_answer(self) -> bool:
        """Inside an answer that is not finished yet (a truncated generation must go on)."""
        return self.phase not in (OUTSIDE, DONE) or bool(self.queue)

    def unused(self) -> list[str]:
        return [label for label in self.tokens.labels if label not in self.used]

    def remaining_tokens(self) -> int:
        """An upper bound on the tokens this row still needs to close its answer."""
        if self.queue:
            return len(self.queue)
        if self.phase == OUTSIDE or self.phase == DONE:
            return 0
        longest = max((len(seq) for seqs in self.tokens.variants.values() for seq in seqs), default=1)
        return len(self.unused()) * (longest + 1) + len(self.tokens.close) + 1

    # -- reading the token just generated -------------------------------------------------------

    def feed(self, token: int, text: str, stop_ids: frozenset[int]) -> None:
        if self.phase == DONE:
            return
        if self.queue:
            self.queue.pop(0)
            if not self.queue:
                self.phase = DONE
            return
        if self.phase == OUTSIDE:
            if token in stop_ids:
                self.phase = DONE
                return
            self.tail = (self.tail + text)[-TAIL_CHARS:]
            if self.tail.rstrip().endswith(ANSWER_OPEN):
                self.phase, self.opened = LABEL, True
            return
        t = self.tokens
        if self.phase == LABEL:
            if self.pending is not None and token == t.separator:
                self._commit(self.pending)
                self.phase = LABEL
                return
            self.partial += (token,)
            complete = self._complete(self.partial)
            if complete is not None and not self._extendable(self.partial):
                self._commit(complete)
                self.phase = CLOSE if not self.unused() else SEPARATOR
            else:
                self.pending = complete
        elif self.phase == SEPARATOR:
            self.phase = LABEL
        elif self.phase == CLOSE:
            self.close_at += 1
            if self.close_at == len(t.close):
                self.phase = STOP
        elif self.phase == STOP:
            self.phase = DONE

    def _head_order(self) -> list[str]:
        from recthinker_dagster.agent.backends.base import head_ranking

        assert self.head_scores is not None
        return head_ranking(self.head_scores, self.tokens.labels)

    def _commit(self, label: str) -> None:
        self.used.append(label)
        self.partial, self.pending = (), None

    def _sequences(self):
        for label in self.unused():
            for seq in self.tokens.variants[label]:
                yield label, seq

    def _complete(self, partial: tuple[int, ...]) -> str | None:
        return next((label for label, seq in self._sequences() if seq == partial), None)

    def _extendable(self, partial: tuple[int, ...]) -> bool:
        n = len(partial)
        return any(len(seq) > n and seq[:n] == partial for _, seq in self._sequences())

    # -- what may come next ---------------------------------------------------------------------

    def allowed(self) -> list[int] | None:
        """Token ids allowed next (None: anything)."""
        if self.queue:
            return [self.queue[0]]
        t, n = self.tokens, len(self.partial)
        if self.phase == LABEL:
            allowed = {seq[n] for _, seq in self._sequences() if len(seq) > n and seq[:n] == self.partial}
            if self.pending is not None:
                allowed.add(t.separator)
            return sorted(allowed)
        if self.phase == SEPARATOR:
            return [t.separator]
        if self.phase == CLOSE:
            return [t.close[self.close_at]]
        if self.phase == STOP:
            return [t.stop]
        return None

    def score_head(self, scores: torch.Tensor) -> None:
        """First answer position, single-token labels: record the head's scores (``scores``: the logits there)."""
        t = self.tokens
        logp = torch.log_softmax(scores.float(), dim=-1)
        self.head_scores = {
            label: float(torch.logsumexp(logp[[seq[0] for seq in t.variants[label]]], dim=0)) for label in t.labels
        }

    def head_draw(self) -> tuple[list[int], list[float]] | None:
        """Logits mode, sampled, at a label position: the unused labels' tokens (bare first, spaced
        after a separator, as ``LabelTokens.answer_tokens`` writes them) and their head scores,
        which replace the position's own logits. None anywhere else."""
        if not (self.sample_ranking and self.mode == "logits" and self.head_scores is not None
                and self.phase == LABEL and not self.queue):
            return None
        unused = self.unused()
        variant = 0 if not self.used else -1
        return ([self.tokens.variants[label][variant][0] for label in unused],
                [self.head_scores[label] for label in unused])

    def start_head(self, scores: torch.Tensor) -> None:
        """Logits mode, first answer position: score the labels by ``scores``. Greedy decoding
        then queues the head's ranking; with ``sample_ranking`` every label is drawn from these
        scores (``head_draw``). Multi-token labels are ranked after generation (``needs_head``)."""
        t = self.tokens
        if not t.single_token:
            self.needs_head = True
            self.queue = [t.stop]
            return
        self.score_head(scores)
        if not self.sample_ranking:
            self.queue = t.answer_tokens(self._head_order())


class TokenTexts:
    """Each token's own text (special tokens kept), decoded once: what :class:`AnswerState`
    reads to spot ``<answer>``."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._texts: dict[int, str] = {}

    def __call__(self, token: int) -> str:
        if token not in self._texts:
            self._texts[token] = self.tokenizer.decode([token], skip_special_tokens=False)
        return self._texts[token]


class AnswerConstraint:
    """A ``transformers`` logits processor over per-row :class:`AnswerState` (None: a free row).

    ``fresh=False`` when the states continue a generation (the first call then has no new token)."""

    def __init__(self, tokenizer, states: Sequence[AnswerState | None], stop_ids: Sequence[int], *, fresh: bool = True,
                 answer_scale: float = 1.0):
        self.tokenizer = tokenizer
        self.answer_scale = answer_scale  # on the allowed scores (SamplingParams.answer_scale)
        self.states = list(states)
        self.stop_ids = frozenset(stop_ids)
        self.started = not fresh
        self._text = TokenTexts(tokenizer)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.started:
            last = input_ids[:, -1].tolist()
            for row, state in enumerate(self.states):
                if state is not None:
                    state.feed(last[row], self._text(last[row]), self.stop_ids)
        self.started = True
        for row, state in enumerate(self.states):
            if state is None or state.phase in (OUTSIDE, DONE) and not state.queue:
                continue
            if state.phase == LABEL and not state.queue and not state.used and not state.partial \
                    and state.head_scores is None and not state.needs_head:
                if state.mode == "logits":
                    state.start_head(scores[row])
                elif state.tokens.single_token:  # kept, so one rollout also gives the head's ranking
                    state.score_head(scores[row])
            drawn = state.head_draw()
            allowed = drawn[0] if drawn is not None else state.allowed()
            if allowed is None:
                continue
            if drawn is not None:  # a label drawn from the head: its ids carry the head's scores
                keep = torch.tensor(drawn[1], dtype=scores.dtype, device=scores.device)
            else:
                keep = scores[row, allowed].clone()
            if self.answer_scale != 1.0:
                keep = keep * self.answer_scale
            scores[row] = float("-inf")
            scores[row, allowed] = keep
        return scores


@dataclass(frozen=True)
class HeadDraw:
    """One label of a sampled logits-mode answer: drawn among ``groups`` (each unused label's
    token ids, bare and spaced; the drawn label's first) by the head's scores at turn position
    ``source`` (the answer's first label, where the scores were read)."""

    source: int
    groups: tuple[tuple[int, ...], ...]


def replay_answer(tokens: LabelTokens, ids: Sequence[int], decode, stop_ids: Sequence[int],
                  label: str | None = None,
                  mode: str = "generate") -> tuple[list[list[int] | None], list[bool], list[HeadDraw | None]]:
    """Per token of one sampled turn, replaying the sampler's state machine over the sampled ids:
    the ids :class:`AnswerConstraint` allowed at its position when it was sampled (None: free),
    whether its answer had already placed ``label`` by then, and (``mode="logits"``) the
    :class:`HeadDraw` of each label token. The first gives back the constraint without the
    sampler keeping it, so a learner scores answer tokens under the distribution they were drawn
    from; the second tells it where the reward was settled.

    ``mode="logits"`` replays a sampled logits-mode turn (``AnswerState.sample_ranking``): every
    answer token allows only itself (the separators and the close are forced, and a label's
    log-prob is not its token's but its draw's, from the first label's position). With multi-token
    labels the head wrote the whole answer: every token is forced and there are no draws."""
    state, stops = AnswerState(tokens, mode), frozenset(stop_ids)
    allowed: list[list[int] | None] = []
    placed: list[bool] = []
    draws: list[HeadDraw | None] = []
    first_label: int | None = None
    for position, token in enumerate(ids):
        draw = None
        if mode == "logits" and state.in_answer:
            if tokens.single_token and state.phase == LABEL:
                first_label = position if first_label is None else first_label
                draw = _head_draw(tokens, state.unused(), token, first_label)
            allowed.append([token])
        else:
            allowed.append(state.allowed() if state.in_answer else None)
        draws.append(draw)
        placed.append(label is not None and label in state.used)
        state.feed(token, decode(token), stops)
    return allowed, placed, draws


def _head_draw(tokens: LabelTokens, unused: Sequence[str], token: int, source: int) -> HeadDraw:
    groups = {label: tuple(seq[0] for seq in tokens.variants[label]) for label in unused}
    drawn = next((label for label, group in groups.items() if token in group), None)
    if drawn is None:
        raise ValueError(f"token {token} at a label position is no unused label's token")
    return HeadDraw(source, (groups.pop(drawn), *groups.values()))
