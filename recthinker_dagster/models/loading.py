"""Load a trained agent policy: the base model with its LoRA adapters merged in, in order.

    model, tokenizer = load_agent_model("assets/base_model", ["assets/sft_model/adapter",
                                                              "assets/rl_model/adapter"])

Training (SFT, GRPO), validation, evaluation and serving all rebuild a policy this way, so
it lives here rather than in any of them. torch, transformers and PEFT are imported on call.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

AdapterDirs = str | os.PathLike | Sequence[str | os.PathLike] | None


def adapter_list(adapter_dirs: AdapterDirs) -> list[Path]:
    """``None``, one folder or several, as a list of paths."""
    if adapter_dirs is None:
        return []
    if isinstance(adapter_dirs, (str, os.PathLike)):
        return [Path(adapter_dirs)]
    return [Path(a) for a in adapter_dirs]


def load_agent_model(base_model_dir: str | os.PathLike, adapter_dirs: AdapterDirs = None, *,
                     dtype: str = "auto", device: str = "auto"):
    """(model, tokenizer): the base model with every LoRA adapter merged in, in order (or the base alone).

    Adapter ``k`` is applied to the model with adapters ``0..k-1`` already merged: an RL adapter
    is trained on the SFT-merged model, so ``[sft_adapter, rl_adapter]`` rebuilds the RL policy.
    The tokenizer (and its chat template) comes from the last adapter folder holding one, else
    from the base model folder. A missing folder is a ``FileNotFoundError`` naming it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from recthinker_dagster.agent.backends.transformers_backend import (
        available_cores,
        resolve_device,
        resolve_dtype,
    )

    base, adapters = Path(base_model_dir), adapter_list(adapter_dirs)
    for folder, what in [(base, "base model"), *((a, f"adapter {k}") for k, a in enumerate(adapters))]:
        if not folder.is_dir():
            raise FileNotFoundError(f"{what} folder {folder} does not exist")
    target = resolve_device(device)
    if target.type == "cpu":
        torch.set_num_threads(available_cores())
    tokenizer_dir = next((a for a in reversed(adapters) if (a / "tokenizer_config.json").is_file()), base)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=resolve_dtype(dtype, target))
    for adapter in adapters:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    return model.to(target).eval(), tokenizer
