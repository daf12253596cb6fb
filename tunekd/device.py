"""Where a model runs and at what precision: the device choice and the autocast context.

A leaf module (torch only), so that the KD loop, the model families and the teacher cache share
one definition without importing each other.
"""

from __future__ import annotations

import contextlib

import torch


def device_for(precision: str = "fp32") -> torch.device:
    """CUDA when there is a GPU, else the CPU (where 'fp16' is refused: it needs a GPU)."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if precision == "fp16":
        raise RuntimeError("train.precision 'fp16' needs a GPU; use 'bf16' or 'fp32' on the CPU")
    return torch.device("cpu")


def autocast(device: torch.device, precision: str):
    """A no-op for 'fp32'; else torch.autocast to bf16 or fp16 on `device`."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)
