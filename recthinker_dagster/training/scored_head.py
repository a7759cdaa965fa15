"""The LM head projected only where a token is trained.

TRL's trainers score tokens through a fused LM head (``trl.trainer.utils.add_fused_lm_head``):
``model(..., labels=labels, fused_lm_head=True)`` returns per-token log-probs instead of the
``(batch, length, vocab)`` logits. With Triton (CUDA) it projects only the labelled positions.
Elsewhere, CPUs included, it projects every position and zeroes the unlabelled ones afterwards.
The head is a quarter of SmolLM2-135M's FLOPs (49,152 x 576 of ~124M weights), and most
positions are context:
- an SFT example labels its assistant turns only, about a fifth of its tokens;
- a GRPO rollout trains on the ids the policy sampled (``env_mask``), not on the prompt, the
  tool results or the template's tokens between turns.

``project_labelled_positions_only`` wraps the fused forward of a model that TRL has patched:
- ``label_filter`` (optional) turns labels to -100 where nothing will be trained, on any device;
- on CPU, the backbone runs as usual, then the head runs on the labelled positions only, in
  float32, in blocks of ``block`` positions. Same fields and shapes as TRL's output; a
  position without a label scores 0, as there.

Models that scale or soft-cap their logits, shifted labels (sequence parallelism) and router
losses keep TRL's path. So does CUDA, where TRL's kernel is already compact.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import cast

import torch

from recthinker_dagster.training.data import IGNORE_INDEX

BLOCK = 1024


def project_labelled_positions_only(model, temperature: float = 1.0,
                                    label_filter: Callable[[torch.Tensor], torch.Tensor] | None = None,
                                    block: int = BLOCK) -> None:
    """Wrap the causal LM's ``forward`` (already patched by TRL's ``add_fused_lm_head``; a PEFT
    wrapper is unwrapped) so that ``fused_lm_head=True`` calls project only labelled positions."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    fused_forward = model.forward
    text_config = model.config.get_text_config()
    plain_head = not any(getattr(text_config, name, None) for name in
                         ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                          "logits_scaling"))

    def forward(self, *args, fused_lm_head=False, labels=None, **kwargs):
        if not fused_lm_head or labels is None:
            return fused_forward(*args, fused_lm_head=fused_lm_head, labels=labels, **kwargs)
        if label_filter is not None:
            labels = label_filter(labels)
        head = self.get_output_embeddings()
        if (not plain_head or head.weight.device.type != "cpu" or kwargs.get("shift_labels") is not None
                or kwargs.get("output_router_logits") or getattr(text_config, "output_router_logits", False)):
            return fused_forward(*args, fused_lm_head=True, labels=labels, **kwargs)
        return _compact_forward(self, head, args, labels, kwargs, temperature, block)

    model.forward = types.MethodType(forward, model)


def _compact_forward(model, head, args, labels, kwargs, temperature: float, block: int):
    from trl.trainer.utils import FusedCausalLMOutput

    num_items = kwargs.pop("num_items_in_batch", None)
    kwargs["use_cache"] = False
    hidden = getattr(model, model.base_model_prefix)(*args, **kwargs).last_hidden_state[:, :-1]
    targets = labels[:, 1:].to(hidden.device)
    mask = targets != IGNORE_INDEX
    log_probs, entropy, is_top1 = score_positions(hidden[mask], head, targets[mask], temperature, block)
    per_token = [hidden.new_zeros(mask.shape, dtype=torch.float32).masked_scatter(mask, values)
                 for values in (log_probs, entropy)]
    top1 = torch.zeros(mask.shape, dtype=torch.bool, device=hidden.device).masked_scatter(mask, is_top1)
    denominator = mask.sum().clamp(min=1) if num_items is None else num_items
    return FusedCausalLMOutput(loss=-per_token[0].sum() / denominator, log_probs=per_token[0], entropy=per_token[1],
                               is_top1=top1, label_mask=mask)


def score_positions(states: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor, temperature: float,
                    block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per position (``states``: ``(n, hidden)``): the log-prob of its target under the
    temperature-scaled head, the distribution's entropy, and whether the target is the argmax.
    Float32 logits, ``block`` positions at a time (their ``(block, vocab)`` logits are the peak)."""
    weight = cast(torch.Tensor, head.weight).float()
    bias = cast(torch.Tensor, head.bias).float() if getattr(head, "bias", None) is not None else None
    scale = temperature if temperature > 0 else 1.0
    log_probs, entropies, top1 = [], [], []
    for start in range(0, max(states.shape[0], 1), block):  # once when empty: keeps the graph connected
        with torch.autocast(states.device.type, enabled=False):  # the trainer's bf16 autocast would round them
            logits = torch.nn.functional.linear(states[start:start + block].float(), weight, bias) / scale
        chosen = targets[start:start + block]
        normaliser = logits.logsumexp(dim=-1)
        log_probs.append(logits.gather(1, chosen[:, None])[:, 0] - normaliser)
        entropies.append(normaliser - (logits.softmax(dim=-1) * logits).sum(dim=-1))
        top1.append(logits.detach().argmax(dim=-1) == chosen)
    return torch.cat(log_probs), torch.cat(entropies), torch.cat(top1)
