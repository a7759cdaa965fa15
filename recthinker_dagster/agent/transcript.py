"""A conversation's exact token ids: what a local model was shown and what it sampled.

    transcript = TokenTranscript(prompt_ids)          # the first generation prompt
    transcript.add_sampled(ids, logprobs)             # the assistant turn, as sampled (mask 1)
    transcript.add_environment(ids)                   # template, tool results, user turns (mask 0)
    next_prompt = transcript.ids                      # the next turn's prompt extends this one

Re-rendering a finished conversation through the chat template does not give back the tokens
the model sampled: text is stripped, tool calls are re-serialised, non-canonical splits
collapse (``Anal`` + ``ysis`` becomes ``Analysis``), and the template adds newlines nobody
generated. A learner that trains on the re-rendered text puts its gradient on tokens the
policy never produced. With a transcript, the loop sends every later turn as the previous
prompt plus the sampled ids plus the template's rendering of what came after them, so each
prompt extends the last one token for token (checked on every turn), and GRPO trains on
exactly ``completion_ids[mask == 1]`` = the sampled ids.

``environment_text`` is where the template's own rendering comes in: the text between the
end of the sampled turn (its stop token) and the next generation prompt.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

UNKNOWN_LOGPROB = math.nan  # a policy token that was not sampled (the forced label head's answer)


class TranscriptMismatch(RuntimeError):
    """A turn's prompt does not extend the conversation's earlier tokens."""


@dataclass
class TokenTranscript:
    prompt_ids: list[int]
    completion_ids: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)  # 1: written by the policy, 0: environment
    logprobs: list[float] = field(default_factory=list)  # the sampler's, 0.0 on environment tokens

    @property
    def ids(self) -> list[int]:
        return self.prompt_ids + self.completion_ids

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)

    def check_prompt(self, prompt_ids: Sequence[int]) -> None:
        """Raise unless ``prompt_ids`` is this transcript exactly (the turn extends the last one)."""
        if list(prompt_ids) != self.ids:
            same = next((k for k, (a, b) in enumerate(zip(prompt_ids, self.ids)) if a != b),
                        min(len(prompt_ids), len(self)))
            raise TranscriptMismatch(f"the generation prompt ({len(prompt_ids)} tokens) does not extend the "
                                     f"conversation's {len(self)} tokens: they part at token {same}")

    def add_sampled(self, ids: Sequence[int], logprobs: Sequence[float] | None = None) -> None:
        if logprobs is not None and len(logprobs) != len(ids):
            raise ValueError(f"{len(logprobs)} log-probs for {len(ids)} sampled tokens")
        self.completion_ids.extend(ids)
        self.mask.extend([1] * len(ids))
        self.logprobs.extend(logprobs if logprobs is not None else [UNKNOWN_LOGPROB] * len(ids))

    def add_environment(self, ids: Sequence[int]) -> None:
        self.completion_ids.extend(ids)
        self.mask.extend([0] * len(ids))
        self.logprobs.extend([0.0] * len(ids))

    def sampled_ids(self) -> list[int]:
        return [token for token, m in zip(self.completion_ids, self.mask) if m]

    def trained_mask(self) -> list[int]:
        """1 on the ids the policy sampled (their log-prob is known), 0 elsewhere. The label head's
        answer (forced after an unanswered final request, or written in ``logits`` mode) stands in
        the policy's turn but was never sampled: a policy gradient on it would move tokens the
        policy did not choose, and a low-reward forced answer would teach it not to open ``<answer>``."""
        return [int(m and not math.isnan(lp)) for m, lp in zip(self.mask, self.logprobs)]

    def trimmed(self) -> TokenTranscript:
        """Without the environment tokens after the last policy token (a learner's completion
        ends where the policy stopped)."""
        last = max((k for k, m in enumerate(self.mask) if m), default=-1) + 1
        return TokenTranscript(list(self.prompt_ids), self.completion_ids[:last], self.mask[:last],
                               self.logprobs[:last])


def environment_text(render, messages: Sequence[dict], tools, assistant_index: int, stop_text: str) -> str:
    """The template's text after the stop token that closes ``messages[assistant_index]`` up to
    the next generation prompt. ``render(messages, tools, add_generation_prompt)`` is the chat
    template; it must render conversations append-only (each rendering a prefix of the next)."""
    before = render(messages[: assistant_index + 1], tools, False)
    after = render(messages, tools, True)
    if not after.startswith(before):
        raise TranscriptMismatch("the chat template does not render the conversation append-only: the text up to "
                                 f"assistant message {assistant_index} changes when later messages follow")
    end = before.rfind(stop_text)
    if end < 0:
        raise TranscriptMismatch(f"the chat template closes assistant turns without {stop_text!r}")
    return before[end + len(stop_text):] + after[len(before):]
