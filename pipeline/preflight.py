"""Checks that run before any stage starts, so a bad setting fails in one line before hours of work:

- layer names (``activations.layers``, ``purifier.layers``) against the configured classifier architecture,
  built on the meta device (no weights, no data): exit 2;
- ``attack.n_examples`` and ``eval.first_example`` + ``eval.n_examples`` against the splits on disk, when the
  stage that uses them is about to run (``plan`` and ``status`` work without the data): exit 2;
- the store root is a writable directory (``run`` only): exit 1.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .config import ConfigError, RunConfig
from .data import load_split
from .models import build_classifier
from .store import StoreError


def hookable_layers(cfg: RunConfig) -> tuple[list[str], list[str]]:
    """(every hookable layer, the default list) of the configured classifier architecture."""
    with torch.device("meta"):
        model = build_classifier(cfg.classifier.arch, cfg.data.dataset, cfg.classifier.activation)
    return model.hookable_layers(), model.default_layers()


def check_layers(cfg: RunConfig) -> None:
    hookable, default = hookable_layers(cfg)
    cached = cfg.activations.layers or default
    bad = [n for n in cached if n not in hookable]
    if bad:
        raise ConfigError(f"config {cfg.name}", "activations.layers", f"unknown layer(s) {', '.join(bad)} for "
                          f"{cfg.classifier.arch}; hookable layers: {', '.join(hookable)}")
    wanted = cfg.purifier.layers or cached
    pool = hookable if cfg.purifier.activations_source == "recompute" else cached
    bad = [n for n in wanted if n not in pool]
    if bad:
        what = "hookable" if pool is hookable else "cached (activations.layers)"
        raise ConfigError(f"config {cfg.name}", "purifier.layers", f"{', '.join(bad)} not among the {what} layers "
                          f"({', '.join(pool)})")


def check_sizes(cfg: RunConfig, stages: list[str]) -> None:
    """Example counts of the ``stages`` about to run against the splits as they are on disk (after
    ``data.*_subset``); never clamped."""
    if "attacks" in stages:
        n_train = len(load_split(cfg.data.dataset, "train", cfg.data.data_dir, cfg.data.train_subset)[1])
        if cfg.attack.n_examples and cfg.attack.n_examples > n_train:
            raise ConfigError(f"config {cfg.name}", "attack.n_examples", f"{cfg.attack.n_examples} exceeds the "
                              f"{n_train} {cfg.data.dataset} training images available")
    if "evaluate" not in stages:
        return
    n_test = len(load_split(cfg.data.dataset, "test", cfg.data.data_dir, cfg.data.test_subset)[1])
    ev = cfg.eval
    if ev.first_example >= n_test:
        raise ConfigError(f"config {cfg.name}", "eval.first_example", f"{ev.first_example}: the {cfg.data.dataset} test "
                          f"split has {n_test} points")
    if ev.n_examples and ev.first_example + ev.n_examples > n_test:
        raise ConfigError(f"config {cfg.name}", "eval.n_examples", f"{ev.n_examples} from eval.first_example="
                          f"{ev.first_example}: the {cfg.data.dataset} test split has {n_test} points")


def check_store_writable(root: Path) -> None:
    if root.exists() and not root.is_dir():
        raise StoreError(f"--store {root}: exists and is not a directory")
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".write-probe.tmp-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise StoreError(f"--store {root}: not writable ({exc.strerror})") from None


def check(ctx, stages: list[str] | None = None) -> None:
    """Everything that can be checked before a stage starts; with the ``stages`` about to run, also their
    example counts against the data and the store's writability."""
    check_layers(ctx.cfg)
    if stages:
        check_sizes(ctx.cfg, stages)
        check_store_writable(ctx.store.root)
