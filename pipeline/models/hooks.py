"""Forward hooks that capture named layers' outputs during a forward pass."""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn


def check_layers(model: nn.Module, layers: list[str]) -> None:
    available = dict(model.named_modules())
    missing = [name for name in layers if name not in available]
    if missing:
        raise KeyError(f"unknown layer(s) {', '.join(missing)}; hookable layers: {', '.join(model.hookable_layers())}")


@contextmanager
def capture(model: nn.Module, layers: list[str]):
    """Yield a dict that, after each forward pass, maps each layer name to its output tensor (not detached)."""
    check_layers(model, layers)
    modules = dict(model.named_modules())
    store: dict[str, torch.Tensor] = {}
    handles = [modules[name].register_forward_hook(lambda _m, _i, out, name=name: store.__setitem__(name, out))
               for name in layers]
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def forward_with_activations(model: nn.Module, x: torch.Tensor, layers: list[str]):
    """``(logits, [activation per layer, in ``layers`` order])``."""
    with capture(model, layers) as store:
        logits = model(x)
    return logits, [store[name] for name in layers]
