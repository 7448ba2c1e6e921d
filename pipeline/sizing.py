"""Bytes each stage writes, from the same arithmetic as storage_layout.md's size table.

Attack shards: a sample is two tar members, each a 512-byte header plus data padded to 512 bytes:
``img.npy`` (128-byte .npy header + C*H*W float32) and ``json`` (< 512 bytes). A shard ends with the tar
end-of-archive blocks, padded to a 10,240-byte record.
Activations: per row, the sum over hooked layers of C*H*W values times the dtype size, before compression,
plus 17 bytes of label (int64), kind (uint8) and index (int64).
"""
from __future__ import annotations

import math

import torch

from .attacks import KINDS
from .data import info
from .models import build_classifier
from .models.hooks import forward_with_activations

TAR_BLOCK, TAR_RECORD, NPY_HEADER = 512, 10240, 128


def _padded(n: int) -> int:
    return math.ceil(n / TAR_BLOCK) * TAR_BLOCK


def attack_sample_bytes(c: int, h: int, w: int) -> int:
    return TAR_BLOCK + _padded(NPY_HEADER + 4 * c * h * w) + TAR_BLOCK + TAR_BLOCK


def shard_bytes(n_samples: int, sample_bytes: int) -> int:
    return math.ceil((n_samples * sample_bytes + 2 * TAR_BLOCK) / TAR_RECORD) * TAR_RECORD


def layer_shapes(arch: str, dataset: str, activation: str, layers: list[str] | None) -> dict[str, tuple]:
    meta = info(dataset)
    with torch.device("meta"):
        model = build_classifier(arch, dataset, activation).eval()
        names = layers or model.default_layers()
        _, acts = forward_with_activations(model, torch.zeros(1, meta.channels, meta.size, meta.size), names)
    return {n: tuple(a.shape[1:]) for n, a in zip(names, acts)}


def estimate(cfg) -> dict:
    """Examples, samples and bytes of the attacks and activations stages for a config."""
    meta = info(cfg.data.dataset)
    n_train = min(meta.train_size, cfg.data.train_subset or meta.train_size)
    n = min(n_train, cfg.attack.n_examples or n_train)
    per_sample = attack_sample_bytes(meta.channels, meta.size, meta.size)
    k = len(KINDS)
    full, rest = divmod(n, cfg.attack.shard_size)
    shards_total = full * shard_bytes(k * cfg.attack.shard_size, per_sample) + (shard_bytes(k * rest, per_sample)
                                                                               if rest else 0)
    shapes = layer_shapes(cfg.classifier.arch, cfg.data.dataset, cfg.classifier.activation, cfg.activations.layers)
    values = sum(math.prod(s) for s in shapes.values())
    row = values * (2 if cfg.activations.dtype == "float16" else 4) + 17
    return {"examples": n, "samples": k * n, "shards": full + bool(rest), "attack_sample_bytes": per_sample,
            "attack_bytes_per_example": k * per_sample, "attack_total_bytes": shards_total,
            "layers": len(shapes), "activation_values_per_row": values, "activation_row_bytes": row,
            "activation_bytes_per_example": k * row, "activation_total_bytes_raw": k * n * row}
