"""Device, CPU threads, precision and data-parallel rank of a training run (shared by SFT and GRPO).

``auto`` precision is bf16 on GPUs that support it and on CPUs with AMX or AVX512-BF16, fp32
elsewhere (fp16 on GPUs without bf16). bf16 loads the frozen base weights in bf16 and trains
the LoRA weights in fp32 under bf16 autocast. torch is imported on call.
"""

from __future__ import annotations

import os


def training_device(device: str, num_threads: int | None = None):
    """The ``torch.device`` a recipe asks for; on CPU, ``num_threads`` threads (None: every core
    this process may use)."""
    import torch

    from recthinker_dagster.agent.backends.transformers_backend import (
        available_cores,
        resolve_device,
    )

    target = resolve_device(device)
    if target.type == "cpu":
        torch.set_num_threads(num_threads or available_cores())
    return target


def resolve_precision(precision: str, device) -> str:
    """``auto`` -> ``bf16`` where it is fast (CUDA with bf16, CPUs with AMX/AVX512-BF16), else ``fp32``."""
    import torch

    from recthinker_dagster.agent.backends.transformers_backend import cpu_has_fast_bf16

    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


def load_dtype(precision: str):
    """The dtype the frozen base weights are loaded in (fp16 runs keep fp32 master weights)."""
    import torch

    return torch.bfloat16 if precision == "bf16" else torch.float32


def torch_threads(device) -> int | None:
    """The CPU threads torch uses (None on an accelerator), for the run's metrics."""
    import torch

    return torch.get_num_threads() if device.type == "cpu" else None


def world_size() -> int:
    """Processes in this training run (``accelerate launch`` sets ``WORLD_SIZE``; 1 alone)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def data_parallel_arguments(gradient_accumulation_steps: int, use_cpu: bool) -> dict:
    """TRL config arguments for this process: its share of the recipe's accumulation steps (so
    the global batch stays the recipe's) and the DDP backend when there are several processes."""
    processes = world_size()
    if gradient_accumulation_steps % processes:
        raise ValueError(f"{processes} processes cannot share gradient_accumulation_steps="
                         f"{gradient_accumulation_steps} equally")
    return {
        "gradient_accumulation_steps": gradient_accumulation_steps // processes,
        "ddp_backend": ("gloo" if use_cpu else "nccl") if processes > 1 else None,
        "ddp_find_unused_parameters": False if processes > 1 else None,
    }
