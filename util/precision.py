"""Mixed precision: one autocast code path for every precision (docs/training.md, 'Mixed precision')."""
import contextlib

import torch


def autocast_factory(amp, device):
    """A zero-argument factory of the context to run forward passes in: a no-op context for 'off' (fp32),
    `torch.autocast(device.type, fp16|bf16)` otherwise. Call sites always write `with autocast():`."""
    if amp == 'off':
        return contextlib.nullcontext
    if amp not in ('fp16', 'bf16'):
        raise ValueError(f"amp must be 'off', 'fp16' or 'bf16', got {amp!r}")
    dtype = torch.float16 if amp == 'fp16' else torch.bfloat16
    return lambda: torch.autocast(device.type, dtype=dtype)
