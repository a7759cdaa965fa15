"""Sample GRPO rollouts with the LoRA adapter merged into the frozen weights.

    with merged_adapter(model):
        trajectories = run_agent(tasks, TransformersBackend(model, tokenizer), toolboxes, config)

During a step's rollouts the policy is the frozen model plus the LoRA adapter being trained.
PEFT runs each adapted linear layer as the frozen layer plus two low-rank matmuls in the
adapter's float32, after casting the activations to float32: on CPU, in a GRPO step's rollouts,
that path took about a third of the linear layers' time (py-spy, docs/training.md). Inside
``merged_adapter`` each adapted layer's weight holds ``W + scale * B @ A`` (summed in float32,
stored in the weight's dtype) and the adapter is disabled, so every layer is one matmul. On exit
the original weights are copied back from a saved copy, not recomputed by subtraction, so bf16
round-off never builds up in the frozen weights (which are also GRPO's KL reference).

The merged weights round the adapter's delta to the weight's dtype: in bf16 the sampled policy
differs from the trained one by that round-off, which ``rollout/sampler_logprob_gap`` measures.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class UnsupportedAdapter(ValueError):
    """An adapter kind whose merge is not ``W + scale * B @ A`` (DoRA and other LoRA variants)."""


@contextlib.contextmanager
def merged_adapter(model) -> Iterator[object]:
    """``model`` (a PEFT model, or any model: then nothing changes) with its active LoRA
    adapters merged into the frozen weights and disabled, for inference only."""
    import torch
    from peft.tuners.lora import LoraLayer

    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for name, module in model.named_modules():
                if not isinstance(module, LoraLayer) or module.merged:
                    continue
                adapters = [adapter for adapter in module.active_adapters if adapter in module.lora_A]
                if not adapters:
                    continue
                variants = getattr(module, "lora_variant", {})
                if any(adapter in variants for adapter in adapters):
                    raise UnsupportedAdapter(f"{name}: merged rollouts take plain LoRA adapters, not "
                                             f"{type(variants[adapters[0]]).__name__}")
                weight = module.get_base_layer().weight
                delta = sum(module.get_delta_weight(adapter).float() for adapter in adapters)
                saved.append((weight, weight.detach().clone()))
                weight.copy_((weight.float() + delta).to(weight.dtype))
        disabled = model.disable_adapter() if saved else contextlib.nullcontext()
        with disabled:
            yield model
    finally:
        with torch.no_grad():
            for weight, original in saved:
                weight.copy_(original)
