"""Candidate labels: single letters where the backbone writes each one as one token.

    labels = candidate_labels(10)                         # ["A", "B", ..., "J"]
    style = choose_label_style(tokenizer, 10)             # "letters", or "numbered" with a warning
    labels = candidate_labels(10, style)

Why letters: an answer is a permutation of the labels, and ``C17`` is three tokens in
SmolLM2's tokenizer (``C``, ``1``, ``7``) where ``Q`` is one. With one token per label a
10-candidate answer is about 22 tokens, each label is one decision of the model, and the
ranking head (``answer_mode: logits``) reads every label's score from a single position.

Two styles, told apart by the labels themselves (so every reader can infer the style):

- ``letters``: ``A``, ``B``, ... (at most 26 candidates), upper case only;
- ``numbered``: ``C1``, ``C2``, ... (any number), the fallback.

A label "fits" a tokenizer when it is one token both as it opens an answer
(``<answer>A``, no space) and as it follows a separator (``, A``, with a leading space),
and when the tokenizer reads a whole answer back as exactly those tokens.
"""

from __future__ import annotations

import logging
import re
import string
import warnings
from collections.abc import Sequence

LETTERS_STYLE = "letters"
NUMBERED_STYLE = "numbered"
LABEL_STYLES = (LETTERS_STYLE, NUMBERED_STYLE)
DEFAULT_LABEL_STYLE = LETTERS_STYLE
LETTERS = tuple(string.ascii_uppercase)
ANSWER_SEPARATOR = ","  # labels in an answer are joined by ", "
NUMBERED_LABEL = re.compile(r"C[1-9]\d*")

logger = logging.getLogger(__name__)


def candidate_labels(n: int, style: str = DEFAULT_LABEL_STYLE) -> list[str]:
    """The labels of ``n`` candidates, in candidate order. More than 26 candidates are always numbered."""
    if style not in LABEL_STYLES:
        raise ValueError(f"unknown label style {style!r}; use one of {list(LABEL_STYLES)}")
    if style == LETTERS_STYLE and n <= len(LETTERS):
        return list(LETTERS[:n])
    return [f"C{k}" for k in range(1, n + 1)]


def label_style_of(labels: Sequence[str]) -> str:
    """``numbered`` when every label is ``C<n>``, else ``letters``."""
    return NUMBERED_STYLE if labels and all(NUMBERED_LABEL.fullmatch(label) for label in labels) else LETTERS_STYLE


def label_range(labels: Sequence[str]) -> str:
    """``A..J`` or ``C1..C10``, for messages."""
    return f"{labels[0]}..{labels[-1]}" if labels else "none"


def looks_like_label(ref: str, labels: Sequence[str]) -> bool:
    """Whether ``ref`` has the shape of a label of this style (used to say "not a candidate")."""
    if label_style_of(labels) == NUMBERED_STYLE:
        return bool(re.fullmatch(r"[Cc]\d+", ref))
    return len(ref) == 1 and ref.isascii() and ref.isalpha()


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def label_token_problems(tokenizer, labels: Sequence[str]) -> list[str]:
    """Why ``labels`` are not single tokens of ``tokenizer`` (empty when they are).

    Checks each label bare and with a leading space, that no two labels share a token, and
    that a whole answer ``<answer>A, B, ...</answer>`` tokenizes into exactly those tokens."""
    problems: list[str] = []
    bare: dict[str, int] = {}
    spaced: dict[str, int] = {}
    for label in labels:
        for variant, table, text in (("bare", bare, label), ("spaced", spaced, " " + label)):
            ids = _ids(tokenizer, text)
            if len(ids) != 1:
                problems.append(f"{text!r} ({variant}) is {len(ids)} tokens {ids}")
            else:
                table[label] = ids[0]
    if problems:
        return problems
    for table, variant in ((bare, "bare"), (spaced, "spaced")):
        if len(set(table.values())) != len(table):
            problems.append(f"two labels share a token ({variant})")
    answer_ids = _ids(tokenizer, f"<answer>{', '.join(labels)}</answer>")
    wanted = [bare[labels[0]]] + [spaced[label] for label in labels[1:]]
    label_ids = set(bare.values()) | set(spaced.values())
    found = [token for token in answer_ids if token in label_ids]
    if found != wanted:
        problems.append(f"in a whole answer the labels tokenize as {found}, not {wanted}")
    return problems


def labels_fit(tokenizer, labels: Sequence[str]) -> bool:
    return not label_token_problems(tokenizer, labels)


def choose_label_style(tokenizer, n_candidates: int, preferred: str = DEFAULT_LABEL_STYLE) -> str:
    """``preferred`` when its labels fit ``tokenizer`` (always so for ``numbered``); else
    ``numbered``, with a warning that says why."""
    if preferred == NUMBERED_STYLE:
        return NUMBERED_STYLE
    labels = candidate_labels(n_candidates, preferred)
    if label_style_of(labels) == NUMBERED_STYLE:
        problems = [f"{n_candidates} candidates are more than the {len(LETTERS)} letters"]
    else:
        problems = label_token_problems(tokenizer, labels)
    if not problems:
        return preferred
    message = (f"candidate labels fall back to multi-token C1..C{n_candidates}: "
               f"the {preferred} labels are not single tokens of this tokenizer ({'; '.join(problems[:3])})")
    warnings.warn(message, stacklevel=2)
    logger.warning(message)
    return NUMBERED_STYLE
