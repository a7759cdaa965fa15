"""Answer tokens scored under the constraint they were sampled with.

Inside ``<answer>`` the sampler draws each label from the distribution renormalised over the
labels still allowed (``agent/backends/constrained.py``). A learner that scores the same token
over the whole vocabulary optimises another distribution: a negative advantage lowers the
label's unconstrained probability and the mass can move to tokens the constraint forbids,
which the sampler never draws; a forced token (``,``, ``</answer>``) carries a gradient
although the policy had no choice. Here the learner's log-prob at a constrained position is
the log-softmax over the allowed ids only, computed from the final hidden state and the output
embedding rows of those ids (no full-vocabulary logits). A forced position scores 0 and
trains nothing.

``allowed`` tables are ``(rows, completion length, width)`` id tensors padded with -1; a
position whose ids are all -1 is free.

Head draws (the ``logits`` answer mode, sampled: ``AnswerState.head_draw``). Each label of the
answer was drawn without replacement from the head's scores at the answer's first label, so
its log-prob is a Plackett–Luce term: its label's score minus the log-sum-exp of the unused
labels' scores, at the answer temperature, all read off that one position (``source``). A
label's score is the log-sum-exp of its tokens' logits (bare and spaced), as the head scores
it. ``head_draw_tables`` holds them as ``source`` (``(rows, length)``, -1: no draw) and
``groups`` (``(rows, length, labels, variants)`` ids, the drawn label's first, padded with -1).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, cast

import torch

FREE = -1
PADDED = -1e9  # a missing variant's logit: finite, so no NaN reaches the gradient


class Draw(Protocol):  # agent.backends.constrained.HeadDraw
    source: int
    groups: tuple[tuple[int, ...], ...]


def allowed_table(rows: Sequence[Sequence[Sequence[int] | None]], length: int) -> torch.Tensor:
    """The ``(len(rows), length, width)`` table of per-position allowed ids (right-padded)."""
    width = max((len(ids) for row in rows for ids in row if ids), default=1)
    table = torch.full((len(rows), length, width), FREE, dtype=torch.long)
    for r, row in enumerate(rows):
        for position, ids in enumerate(row[:length]):
            if ids:
                table[r, position, : len(ids)] = torch.tensor(list(ids), dtype=torch.long)
    return table


def constrained_mask(allowed: torch.Tensor) -> torch.Tensor:
    """``(rows, length)`` booleans: True at the constrained positions of a table."""
    return allowed[..., 0] != FREE


def constrained_positions(allowed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, position) indices of the constrained positions of a table."""
    rows, positions = constrained_mask(allowed).nonzero(as_tuple=True)
    return rows, positions


def log_prob_among(scores: torch.Tensor, allowed: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """Per row, the log-softmax of ``chosen`` among ``allowed`` ids, from their ``scores``
    (``(n, width)``, aligned with ``allowed``; padding ignored). A chosen id outside its
    allowed set is a caller's bug: it raises rather than training on a wrong figure."""
    valid = allowed != FREE
    hit = (allowed == chosen[:, None]) & valid
    if not bool(hit.any(dim=1).all()):
        raise ValueError("a sampled answer token is not among the ids its constraint allowed")
    scores = scores.float().masked_fill(~valid, float("-inf"))
    return scores.masked_fill(~hit, float("-inf")).logsumexp(dim=1) - scores.logsumexp(dim=1)


def restrict_logprobs(logps: torch.Tensor, hidden: torch.Tensor, output_embeddings: torch.nn.Module,
                      completion_ids: torch.Tensor, allowed: torch.Tensor, temperature: float) -> torch.Tensor:
    """``logps`` (``(rows, C)``, the trainer's per-token log-probs of the completion) with every
    constrained position replaced by its log-prob among the allowed ids. ``hidden`` is the
    backbone's last hidden state over prompt + completion (``(rows, L, H)``): the completion's
    token ``j`` is predicted at ``L - C - 1 + j``. Differentiable through ``hidden`` and the
    embedding rows."""
    rows, positions = constrained_positions(allowed)
    if rows.numel() == 0:
        return logps
    length, width = hidden.shape[1], logps.shape[1]
    states = hidden[rows, length - width - 1 + positions]
    ids = allowed[rows, positions]
    embedding_rows = cast(torch.Tensor, output_embeddings.weight)
    weight = embedding_rows[ids.clamp(min=0)]  # (n, width, H)
    scores = torch.einsum("nh,nkh->nk", states.to(weight.dtype), weight)
    bias = getattr(output_embeddings, "bias", None)
    if bias is not None:
        scores = scores + bias[ids.clamp(min=0)]
    restricted = log_prob_among(scores.float() / (temperature if temperature > 0 else 1.0), ids,
                                completion_ids[rows, positions])
    return logps.index_put((rows, positions), restricted.to(logps.dtype))


def head_draw_tables(rows: Sequence[Sequence[Draw | None]], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(source, groups)`` tables of per-position head draws (module docstring)."""
    draws = [draw for row in rows for draw in row if draw is not None]
    labels = max((len(d.groups) for d in draws), default=1)
    variants = max((len(g) for d in draws for g in d.groups), default=1)
    source = torch.full((len(rows), length), FREE, dtype=torch.long)
    groups = torch.full((len(rows), length, labels, variants), FREE, dtype=torch.long)
    for r, row in enumerate(rows):
        for position, draw in enumerate(row[:length]):
            if draw is not None:
                source[r, position] = draw.source
                for g, ids in enumerate(draw.groups):
                    groups[r, position, g, : len(ids)] = torch.tensor(list(ids), dtype=torch.long)
    return source, groups


def drawn_label_log_prob(scores: torch.Tensor, ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per draw, the Plackett–Luce log-prob of its first group among all its groups: ``scores``
    are the logits of ``ids`` (``(n, labels, variants)``, -1 padded) at the draw's source."""
    scores = scores.float().masked_fill(ids == FREE, PADDED)
    label_scores = scores.logsumexp(dim=-1) / (temperature if temperature > 0 else 1.0)
    label_scores = label_scores.masked_fill((ids == FREE).all(dim=-1), float("-inf"))
    return label_scores[:, 0] - label_scores.logsumexp(dim=-1)


def head_draw_logprobs(logps: torch.Tensor, hidden: torch.Tensor, output_embeddings: torch.nn.Module,
                       source: torch.Tensor, groups: torch.Tensor, temperature: float) -> torch.Tensor:
    """``logps`` with every head-draw position replaced by its draw's log-prob, scored from the
    hidden state that predicts its ``source`` token (as in :func:`restrict_logprobs`)."""
    rows, positions = (source != FREE).nonzero(as_tuple=True)
    if rows.numel() == 0:
        return logps
    length, width = hidden.shape[1], logps.shape[1]
    states = hidden[rows, length - width - 1 + source[rows, positions]]
    ids = groups[rows, positions]
    safe = ids.clamp(min=0)
    weight = cast(torch.Tensor, output_embeddings.weight)[safe]  # (n, labels, variants, H)
    scores = torch.einsum("nh,ngvh->ngv", states.to(weight.dtype), weight)
    bias = getattr(output_embeddings, "bias", None)
    if bias is not None:
        scores = scores + bias[safe]
    return logps.index_put((rows, positions), drawn_label_log_prob(scores, ids, temperature).to(logps.dtype))
