"""Adversarially-balanced batches (section 4.4) drawn from the stored shards, per data-parallel worker.

Composition: of a global batch of B examples, ``round(B * adv_fraction)`` are adversarial, dealt in turn to
the attack kinds (FGSM eps/2, FGSM eps, PGD eps/2, PGD eps), the rest clean. Global batch position p goes to
worker ``p % W``, so the global composition is the same for any number of workers W, and a small fraction
never rounds to zero per worker (TinyImageNet's 0.01 of 1024 gives 10 adversarial examples per step).

Order: each worker owns the shards ``k % W == rank``; every epoch it visits them in a fresh random order,
loads each shard whole (chunks decode whole anyway), and draws batches at random from a shuffle buffer of
examples. Each example enters the buffer as its own copy, so a shard's memory is freed as soon as it is split
(otherwise one example left undrawn keeps its whole shard alive: with a WRN's 1.9 MB of activations per example,
several such shards per worker ran a 24 GB machine out of memory). The position of an example in its batch decides its kind, so the input is the stored sample of
that kind and the target is the same example's clean image.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .kinds import KINDS, N_KINDS
from .shards import read_shard_arrays
from .store import Output as Out
from .store import require_intact
from .zarr_store import ActivationReader

ATTACK_KINDS = [k for k in KINDS if k != "clean"]


def global_kinds(batch_size: int, adv_fraction: float) -> list[int]:
    """Kind index (into KINDS) of each position of a global batch."""
    n_adv = int(round(batch_size * adv_fraction))
    adv = [KINDS.index(ATTACK_KINDS[i % len(ATTACK_KINDS)]) for i in range(n_adv)]
    return adv + [KINDS.index("clean")] * (batch_size - n_adv)


def worker_kinds(batch_size: int, adv_fraction: float, workers: int, rank: int) -> list[int]:
    if batch_size % workers:
        raise ValueError(f"purifier.batch_size={batch_size} must be divisible by the number of workers ({workers})")
    return global_kinds(batch_size, adv_fraction)[rank::workers]


def worker_shards(n_shards: int, workers: int, rank: int) -> list[int]:
    return list(range(rank, n_shards, workers))


def steps_per_epoch(examples_per_shard: list[int], batch_size: int, workers: int) -> int:
    """Equal for every worker (DDP needs it): the smallest worker's full batches."""
    per_worker = batch_size // workers
    return min(sum(examples_per_shard[k] for k in worker_shards(len(examples_per_shard), workers, r)) // per_worker
               for r in range(workers))


@dataclass
class ShardData:
    """One attack shard in memory: images (5n, C, H, W) float32, optional activations per layer (5n, ...)."""

    images: np.ndarray
    acts: dict[str, np.ndarray] | None

    @property
    def n_examples(self) -> int:
        return len(self.images) // len(KINDS)

    def examples(self) -> list["ShardData"]:
        """One ShardData per example (its rows of every kind), each a copy: none keeps this shard alive."""
        n = len(KINDS)
        return [ShardData(images=self.images[n * e:n * e + n].copy(),
                          acts=None if self.acts is None else {k: a[n * e:n * e + n].copy() for k, a in self.acts.items()})
                for e in range(self.n_examples)]


@dataclass
class Batch:
    inputs: np.ndarray          # the (possibly perturbed) images the classifier saw
    targets: np.ndarray         # the clean images
    kinds: np.ndarray           # kind index per example
    acts: dict[str, np.ndarray] | None


class BalancedBatches:
    """Yields ``steps`` balanced batches per epoch for one worker."""

    def __init__(self, load_shard: Callable[[int], ShardData], n_shards: int, *, batch_size: int,
                 adv_fraction: float, workers: int, rank: int, steps: int, buffer_examples: int, seed: int):
        self.load_shard = load_shard
        self.kinds = np.array(worker_kinds(batch_size, adv_fraction, workers, rank))
        self.shards = worker_shards(n_shards, workers, rank)
        self.steps, self.buffer, self.seed, self.rank = steps, buffer_examples, seed, rank

    def epoch(self, epoch: int) -> Iterator[Batch]:
        """The epoch's batches. The next shard loads in a background thread while the current one is
        consumed (decoding and decompression release the GIL)."""
        rng = np.random.default_rng([self.seed, epoch, self.rank])
        order = [int(s) for s in rng.permutation(self.shards)]
        pool: list[tuple[ShardData, int]] = []
        b, emitted = len(self.kinds), 0
        with ThreadPoolExecutor(max_workers=1) as prefetch:
            pending = prefetch.submit(self.load_shard, order[0]) if order else None
            for i in range(len(order)):
                examples = pending.result().examples()
                pending = prefetch.submit(self.load_shard, order[i + 1]) if i + 1 < len(order) else None
                pool += [(x, 0) for x in examples]
                del examples
                while len(pool) >= self.buffer + b and emitted < self.steps:
                    yield self._draw(pool, rng)
                    emitted += 1
                if emitted >= self.steps:
                    break
            if pending is not None:
                pending.cancel()
        while len(pool) >= b and emitted < self.steps:
            yield self._draw(pool, rng)
            emitted += 1

    def _draw(self, pool: list, rng: np.random.Generator) -> Batch:
        picks = []
        for i in rng.choice(len(pool), size=len(self.kinds), replace=False).tolist():
            picks.append(pool[i])
        chosen = set(id(p) for p in picks)
        pool[:] = [p for p in pool if id(p) not in chosen]
        n_kinds = len(KINDS)
        inputs = np.stack([d.images[n_kinds * e + k] for (d, e), k in zip(picks, self.kinds)])
        targets = np.stack([d.images[n_kinds * e] for d, e in picks])
        acts = None
        if picks[0][0].acts is not None:
            acts = {name: np.stack([d.acts[name][n_kinds * e + k] for (d, e), k in zip(picks, self.kinds)])
                    for name in picks[0][0].acts}
        return Batch(inputs=inputs, targets=targets, kinds=self.kinds.copy(), acts=acts)


class ShardLoader:
    """Loads one attack shard (verified) and, in cache mode, its activation rows; keeps them if small."""

    def __init__(self, *, attacks_dir: str, layers: list[str], activations_dir: str | None = None,
                 cache_bytes: int = 0):
        """``activations_dir``: also read the cached activations of ``layers`` (``purifier.activations_source:
        cache``); None: images only (``recompute``). ``cache_bytes``: how much of the loaded shards to keep."""
        self.attacks = Out(Path(attacks_dir), "attacks", "")
        manifest = self.attacks.manifest()
        self.records = {r["name"]: r for r in manifest["files"]}
        self.units = manifest["units"]
        self.reader = None
        if activations_dir is not None:
            self.reader = ActivationReader(Out(Path(activations_dir), "activations", ""), list(layers))
        self.keep = {}
        self.kept_bytes, self.budget = 0, cache_bytes

    def __call__(self, sid: int):
        if sid in self.keep:
            return self.keep[sid]
        u = self.units[sid]
        name = f"{u['unit']}.tar"
        require_intact(self.attacks, self.records[name])
        images = read_shard_arrays(self.attacks.dir / name)["image"]
        acts = None
        if self.reader is not None:
            rows = self.reader.read(N_KINDS * u["start"], N_KINDS * u["stop"])
            acts = {n: rows[n] for n in self.reader.layers}
        data = ShardData(images=images, acts=acts)
        size = images.nbytes + sum(a.nbytes for a in (acts or {}).values())
        if self.kept_bytes + size <= self.budget:
            self.keep[sid] = data
            self.kept_bytes += size
        return data
