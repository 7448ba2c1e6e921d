"""Checks that run before any stage starts, so a bad setting fails in one line before hours of work:

- layer names (``activations.layers``, ``purifier.layers``, ``probes.layers``) against the configured classifier architecture,
  built on the meta device (no weights, no data): exit 2;
- ``attack.n_examples``, ``eval.first_example`` + ``eval.n_examples`` and the probes' points against the splits on disk, when the
  stage that uses them is about to run (``plan`` and ``status`` work without the data): exit 2;
- the store root is a writable directory (``run`` only): exit 1;
- the free space under the store root against what the stages about to run write (``pending_bytes``: the plan's
  arithmetic, pipeline/sizing.py; activations at their measured compression ratio; finished stages and finished
  units not counted), ``run`` only, unless ``SPACE_CHECK`` is off (``--no-space-check``): exit 2.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .config import ConfigError, RunConfig
from .data import load_split
from .errors import NotEnoughSpace, UserError, free_bytes
from .log import human_bytes
from .models import build_classifier
from .sizing import stage_bytes
from .store import StoreError

# The free-space check of ``check``; the CLI's --no-space-check turns it off for its process (run and sweep).
SPACE_CHECK = True


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
    bad = [n for n in (cfg.probes.layers or []) if n not in cached]
    if bad:
        raise ConfigError(f"config {cfg.name}", "probes.layers", f"{', '.join(bad)} not among the cached layers "
                          f"(activations.layers: {', '.join(cached)})")
    wanted = cfg.purifier.layers or cached
    pool = hookable if cfg.purifier.activations_source == "recompute" else cached
    bad = [n for n in wanted if n not in pool]
    if bad:
        what = "hookable" if pool is hookable else "cached (activations.layers)"
        raise ConfigError(f"config {cfg.name}", "purifier.layers", f"{', '.join(bad)} not among the {what} layers "
                          f"({', '.join(pool)})")


def training_images(cfg: RunConfig) -> int:
    """The training images as they are on disk (after ``data.train_subset``)."""
    return len(load_split(cfg.data.dataset, "train", cfg.data.data_dir, cfg.data.train_subset)[1])


def check_sizes(cfg: RunConfig, stages: list[str]) -> dict:
    """Example counts of the ``stages`` about to run against the splits as they are on disk (after
    ``data.*_subset``); never clamped. Returns what it read: ``{"n_train": ...}`` when attacks is about to run."""
    counts = {}
    if "attacks" in stages:
        n_train = counts["n_train"] = training_images(cfg)
        if cfg.attack.n_examples and cfg.attack.n_examples > n_train:
            raise ConfigError(f"config {cfg.name}", "attack.n_examples", f"{cfg.attack.n_examples} exceeds the "
                              f"{n_train} {cfg.data.dataset} training images available")
    if "probes" in stages:
        pr = cfg.probes
        n_test = len(load_split(cfg.data.dataset, "test", cfg.data.data_dir, cfg.data.test_subset)[1])
        if pr.first_example + pr.n_examples > n_test:
            raise ConfigError(f"config {cfg.name}", "probes.n_examples", f"{pr.n_examples} from probes.first_example="
                              f"{pr.first_example}: the {cfg.data.dataset} test split has {n_test} points")
        if pr.robust:
            n_train = len(load_split(cfg.data.dataset, "train", cfg.data.data_dir, cfg.data.train_subset)[1])
            if pr.robust_examples > n_train:
                raise ConfigError(f"config {cfg.name}", "probes.robust_examples", f"{pr.robust_examples} exceeds the "
                                  f"{n_train} {cfg.data.dataset} training images available")
    if "evaluate" not in stages:
        return counts
    n_test = len(load_split(cfg.data.dataset, "test", cfg.data.data_dir, cfg.data.test_subset)[1])
    ev = cfg.eval
    if ev.first_example >= n_test:
        raise ConfigError(f"config {cfg.name}", "eval.first_example", f"{ev.first_example}: the {cfg.data.dataset} test "
                          f"split has {n_test} points")
    if ev.n_examples and ev.first_example + ev.n_examples > n_test:
        raise ConfigError(f"config {cfg.name}", "eval.n_examples", f"{ev.n_examples} from eval.first_example="
                          f"{ev.first_example}: the {cfg.data.dataset} test split has {n_test} points")
    return counts


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


def written_bytes(out) -> int:
    """Bytes of the files the finished units of ``out`` list in their receipts (0 where none is readable)."""
    try:
        return sum(int(f["bytes"]) for r in out.receipts() for f in r["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def _output(ctx, stage: str):
    """The output of ``stage``, or None when its key cannot be known yet (an upstream output is missing) or an
    upstream manifest is unreadable: then the stage that reads it fails with its own line, not this check."""
    try:
        return ctx.output_or_none(stage)
    except UserError:
        return None


def pending_bytes(ctx, stages: list[str], n_train: int | None = None) -> dict[str, int]:
    """About how many bytes each of ``stages`` still writes (``sizing.stage_bytes`` less what its finished units'
    receipts list; the purifier's rotating checkpoints are counted whole); a finished stage (a cache hit) none.
    ``n_train``: the training images on disk; else the finished attacks output's count, else the config's."""
    cfg, pending = ctx.cfg, {}
    if n_train is None and {"attacks", "activations"} & set(stages):
        attacks = _output(ctx, "attacks")
        try:
            n_train = int(attacks.manifest()["counts"]["examples"]) if attacks and attacks.is_complete() else None
        except (UserError, KeyError, TypeError, ValueError):  # a corrupt manifest: the stage reading it says so
            n_train = None
    for stage in stages:
        out = _output(ctx, stage)  # None: its key is not known yet, so it has written nothing
        if out is not None and out.is_complete():
            continue
        total = stage_bytes(cfg, stage, n_train)
        done = written_bytes(out) if out is not None and stage != "purifier" else 0
        pending[stage] = max(0, total - done)
    return pending


def describe(pending: dict[str, int], ctx) -> str:
    """``attacks 256.1 MB, activations ~1.7 GB compressed estimate``: the stages that write something."""
    parts = []
    for stage, n in pending.items():
        if n <= 0:
            continue
        out = _output(ctx, stage)
        resumed = out is not None and bool(out.done_units())
        approx = "~" if stage == "activations" else ""
        parts.append(f"{stage} {approx}{human_bytes(n)}" + (" compressed estimate" if approx else "")
                     + (" still to write" if resumed else ""))
    return ", ".join(parts)


def check_free_space(ctx, stages: list[str], n_train: int | None = None) -> None:
    """NotEnoughSpace (exit 2) when the free space under the store root is less than what ``stages`` write."""
    pending = pending_bytes(ctx, stages, n_train)
    need, free = sum(pending.values()), free_bytes(ctx.store.root)
    if free is None or need <= free:
        return
    raise NotEnoughSpace(f"--store {ctx.store.root}: {human_bytes(free)} free, the stages about to run write about "
                         f"{human_bytes(need)} ({describe(pending, ctx)}); free space or pass --no-space-check")


def check(ctx, stages: list[str] | None = None) -> None:
    """Everything that can be checked before a stage starts; with the ``stages`` about to run, also their
    example counts against the data, the store's writability and (``SPACE_CHECK``) its free space."""
    check_layers(ctx.cfg)
    if stages:
        counts = check_sizes(ctx.cfg, stages)
        check_store_writable(ctx.store.root)
        if SPACE_CHECK:
            check_free_space(ctx, stages, counts.get("n_train"))
