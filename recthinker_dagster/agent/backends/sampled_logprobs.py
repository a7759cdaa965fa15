"""The log-probability of every token ``model.generate`` samples, recorded on the fly.

``SampledLogprobs`` is the last custom ``LogitsProcessor``: at each decoding step it keeps the
log-softmax of the step's scores (after the answer constraint, divided by the temperature)
and, on the next step, reads off the probability of the token that was chosen. ``finish``
takes the last step's tokens. Memory is one ``(batch, vocab)`` row set, not one per step as
``output_scores=True`` would keep. Top-p truncation is applied by ``generate`` after this
processor, so with ``top_p < 1`` the figures are those of the untruncated distribution.
Greedy decoding records the plain log-softmax.
"""

from __future__ import annotations

import torch


class SampledLogprobs:
    def __init__(self, temperature: float):
        self.temperature = temperature if temperature > 0 else 1.0
        self.steps: list[torch.Tensor] = []  # per step: (batch,) log-probs of the chosen tokens
        self._last: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self._take(input_ids[:, -1])
        self._last = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def finish(self, last_tokens: torch.Tensor) -> list[list[float]]:
        """Per row, the log-prob of each generated token (``last_tokens``: the final step's)."""
        self._take(last_tokens)
        if not self.steps:
            return []
        return torch.stack(self.steps, dim=1).tolist()

    def _take(self, chosen: torch.Tensor) -> None:
        if self._last is not None:
            self.steps.append(self._last.gather(1, chosen.to(self._last.device).view(-1, 1)).squeeze(1).cpu())
            self._last = None
