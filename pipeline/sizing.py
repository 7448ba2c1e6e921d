"""Bytes each stage writes, from the same arithmetic as storage_layout.md's size table.

Attack shards: a sample is two tar members, each a 512-byte header plus data padded to 512 bytes:
``img.npy`` (128-byte .npy header + C*H*W float32) and ``json`` (< 512 bytes). A shard ends with the tar
end-of-archive blocks, padded to a 10,240-byte record.
Activations: per row, the sum over hooked layers of C*H*W values times the dtype size, before compression,
plus 17 bytes of label (int64), kind (uint8) and index (int64); on disk, about ``ACTIVATIONS_COMPRESSION`` of that.
``stage_bytes``: what each stage writes in all, for the preflight's free-space check and ``pipeline plan``.
"""
from __future__ import annotations

import functools
import math

import torch

from .attacks import KINDS
from .data import info
from .models import build_classifier
from .models.hooks import forward_with_activations

TAR_BLOCK, TAR_RECORD, NPY_HEADER = 512, 10240, 128

# Zarr bytes on disk / raw bytes of the activations, measured on the default job (storage_layout.md, Sizes:
# 1,725,000,606 bytes for 2,196,050,000 raw; Blosc zstd level 3 + bitshuffle on the SmallCNN's float16 maps).
# Other layers, dtypes and levels compress differently, so every figure from it is called an estimate.
ACTIVATIONS_COMPRESSION = 0.79
# A purifier checkpoint: fast and slow (Lookahead) weights, RAdam's two moments and Lookahead's state, ~5 x the
# parameters; three exist for a moment (the newest is written before the oldest of the two kept is removed),
# plus purifier.pt. float32 throughout.
PURIFIER_COPIES = 3 * 5 + 1


def _padded(n: int) -> int:
    return math.ceil(n / TAR_BLOCK) * TAR_BLOCK


def attack_sample_bytes(c: int, h: int, w: int) -> int:
    return TAR_BLOCK + _padded(NPY_HEADER + 4 * c * h * w) + TAR_BLOCK + TAR_BLOCK


def shard_bytes(n_samples: int, sample_bytes: int) -> int:
    return math.ceil((n_samples * sample_bytes + 2 * TAR_BLOCK) / TAR_RECORD) * TAR_RECORD


def layer_shapes(arch: str, dataset: str, activation: str, layers: list[str] | None) -> dict[str, tuple]:
    """Each hooked layer's output shape (C, H, W), from one forward pass on the meta device (no weights
    allocated). Computed once per process and architecture: a `plan` or a run asks for it from several places."""
    return dict(_layer_shapes(arch, dataset, activation, tuple(layers) if layers else None))


@functools.lru_cache(maxsize=64)
def _layer_shapes(arch: str, dataset: str, activation: str, layers: tuple[str, ...] | None) -> tuple:
    meta = info(dataset)
    with torch.device("meta"):
        model = build_classifier(arch, dataset, activation).eval()
        names = list(layers) if layers else model.default_layers()
        _, acts = forward_with_activations(model, torch.zeros(1, meta.channels, meta.size, meta.size), names)
    return tuple((n, tuple(a.shape[1:])) for n, a in zip(names, acts))


def estimate(cfg, n_train: int | None = None) -> dict:
    """Examples, samples and bytes of the attacks and activations stages for a config; ``n_train``: the training
    images as they are on disk (after ``data.train_subset``), else the dataset's documented split size."""
    meta = info(cfg.data.dataset)
    if n_train is None:
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
            "activation_bytes_per_example": k * row, "activation_total_bytes_raw": k * n * row,
            "activation_total_bytes_compressed": int(k * n * row * ACTIVATIONS_COMPRESSION)}


def _classifier_values(cfg) -> int:
    with torch.device("meta"):
        model = build_classifier(cfg.classifier.arch, cfg.data.dataset, cfg.classifier.activation)
    return sum(t.numel() for t in model.state_dict().values())


def _purifier_parameters(cfg) -> int:
    from .models.purifier import Purifier

    meta, p, c = info(cfg.data.dataset), cfg.purifier, cfg.classifier
    shapes = layer_shapes(c.arch, cfg.data.dataset, c.activation, cfg.activations.layers)
    layers = p.layers or list(shapes)
    if p.activations_source == "recompute":
        shapes = layer_shapes(c.arch, cfg.data.dataset, c.activation, layers)
    with torch.device("meta"):
        model = Purifier(image_shape=(meta.channels, meta.size, meta.size), layer_shapes={n: shapes[n] for n in layers},
                         fc_repr=p.fc_repr, f_joint=p.f_joint, encoder_convs=p.encoder_convs, mean=meta.mean,
                         std=meta.std)
    return sum(q.numel() for q in model.parameters())


# Stages whose outputs are small (JSON, a report, a figure, a few small weights): not counted.
SMALL = ("evaluate", "probes")


def stage_bytes(cfg, stage: str, n_train: int | None = None) -> int:
    """About how many bytes ``stage`` writes in all (0 for the small outputs, ``SMALL``); activations after
    compression (``ACTIVATIONS_COMPRESSION``). An estimate: receipts and metadata files are left out."""
    if stage == "classifier":
        return 4 * _classifier_values(cfg)
    if stage == "attacks":
        return estimate(cfg, n_train)["attack_total_bytes"]
    if stage == "activations":
        return estimate(cfg, n_train)["activation_total_bytes_compressed"]
    if stage == "purifier":
        return 4 * PURIFIER_COPIES * _purifier_parameters(cfg)
    return 0
