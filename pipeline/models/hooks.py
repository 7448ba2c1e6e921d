"""Forward hooks that capture named layers' outputs during a forward pass."""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np
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


def activation_rows(model: nn.Module, images: np.ndarray, layers: list[str], *, batch_size: int, dtype: str,
                    precision: str, device: str) -> dict[str, np.ndarray]:
    """The activations stage's rows: ``images`` through ``model`` in batches of ``batch_size`` without gradients
    (under ``precision``'s autocast), each hooked layer's output copied to the host and cast to ``dtype``."""
    from ..precision import autocast

    np_dtype = np.dtype(dtype)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in layers}
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            x = torch.from_numpy(images[i:i + batch_size]).to(device)
            with autocast(precision, device):
                _, acts = forward_with_activations(model, x, layers)
            for name, a in zip(layers, acts):
                parts[name].append(a.float().cpu().numpy().astype(np_dtype))
    return {name: np.concatenate(v) for name, v in parts.items()}
