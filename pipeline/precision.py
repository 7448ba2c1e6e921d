"""Opt-in bfloat16 autocast (config ``<section>.precision: bfloat16``) for attack generation, activations,
purifier training and, only when asked, the evaluation. float32 is the default everywhere.

Under autocast, matrix products and convolutions run in bfloat16 while reductions, losses and the stored
outputs stay float32 (``torch.autocast``'s rules); weights are never converted. A bfloat16 output has its own
store key, and its manifest records the precision.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

PRECISIONS = ("float32", "bfloat16")


def autocast(precision: str, device: str | torch.device):
    """A context under which the forward passes run at ``precision``."""
    if precision == "float32":
        return contextlib.nullcontext()
    if precision != "bfloat16":
        raise ValueError(f"unknown precision {precision!r}; one of {', '.join(PRECISIONS)}")
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


class Autocast(nn.Module):
    """Wraps a model so that every call runs under ``autocast(precision)`` and returns float32 (what attack code
    expects). Its ``state_dict`` is the wrapped model's."""

    def __init__(self, model: nn.Module, precision: str, device: str | torch.device):
        super().__init__()
        self.model, self.precision, self.device_type = model, precision, torch.device(device).type

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with autocast(self.precision, self.device_type):
            return self.model(x).float()


def wrap(model: nn.Module, precision: str, device: str | torch.device) -> nn.Module:
    """``model`` itself at float32, else an ``Autocast`` wrapper."""
    return model if precision == "float32" else Autocast(model, precision, device)
