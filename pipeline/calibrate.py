"""Each stage's unit of work timed on this machine, and every stage's seconds projected from those measured rates
(``pipeline plan --calibrate``; ``bench/efficiency.py`` times the same units against the machine's peaks). Plain
PyTorch: no Ray, no store.

The units (``build_units``), on the config's own models built as the stages build them (random weights: the cost
does not depend on them), at the stages' own batch sizes and precisions:

- ``classifier_train``: one step of the classifier's adversarial training on ``classifier.train.batch_size``
  images (``pipeline.adv_train.adversarial_step``: PGD-k in eval mode, forward, backward, SGD step);
- ``classifier_test``: one PGD step of its test evaluation on ``classifier.train.eval_batch_size`` images;
- ``attack``: one PGD step of the attacks stage on ``attack.batch_size`` images (forward and backward to the
  input, signed step, projection; ``pipeline.attacks.pgd`` with one step), at ``attack.precision``;
- ``activations``: the activations stage's forward on ``activations.batch_size`` images, the classifier with hooks
  on the cached layers, no gradients (``bench/efficiency.py``'s unit);
- ``activation_rows``: what the activations stage does per row, on one Zarr chunk's rows (``activations.chunk_rows``):
  the shard's sha256 and its reading, that forward, the copy to the host, the cast to ``activations.dtype``, the
  compression into Zarr arrays written to disk (a temporary folder) and the chunk files' sha256 for the receipt;
- ``purifier``: one purifier training step on one worker's batch (``purifier.batch_size / purifier.workers``):
  forward, VAE loss, backward, RAdam + Lookahead (``pipeline.purifier_train.train_step``); the conditioning made
  once beforehand as the cache serves it, or, with ``activations_source: recompute``, inside the unit;
- ``carso``: one CARSO input gradient over an evaluation chunk (``eval.chunk_size`` points x ``eval.samples``
  reconstructions): every attack step of the evaluation is one;
- ``classifier_aa``: one PGD step on the classifier alone over a chunk (at most ``eval.batch_size`` points): the
  rate at which standard AutoAttack's gradient passes and Square's forwards on the classifier are projected;
- ``probes``: one PGD step on the classifier on ``probes.batch_size`` points (the probes' attacks, counted as
  whole classifier gradient passes by ``pipeline.flops.probe_flops``).

Each unit runs once to warm up, then until ``seconds`` have passed (at least 3 calls, at most 50); its time is the
median. A unit's FLOPs are ``pipeline.flops.per_example`` times its batch (convolutions and matrix products only),
so its FLOP/s are the rate at which the stage turns counted FLOPs into seconds, elementwise work, losses and
optimizer steps included.

``project``: the units on the device a stage would use (CUDA when present, else the CPU), each at the torch threads
one of the stage's workers gets on this machine (``pipeline.cluster.worker_share``), and every stage's seconds =
its FLOPs by kind of work (``pipeline.flops.stage_parts``) / the measured rate of that kind's unit / the stage's
concurrent workers (the stages' own rules: one classifier task; attacks and activations one actor per GPU, else one
on every core; ``purifier.workers``; evaluate and probes one task per GPU or core, at most one per chunk or layer).
On CPU with several purifier workers, its unit is timed in the stage's own layout (``measure_purifier_ddp``: the
workers as processes at once, DDP over gloo), and the seconds those processes took to start are added to the
stage's. The evaluation's work is what AutoAttack's runner is expected to attack (``pipeline.plan.expected_attacked``:
the trained classifier's accuracies; every attack on every point before it exists). Not included: Ray's start-up,
reading the dataset, starting the other stages' workers and building their models, the attack shards' and
checkpoints' writes, and the evaluation's forward-only scoring passes.
"""
from __future__ import annotations

import copy
import math
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import zarr_store
from .attacks import KINDS, input_gradient, pgd
from .cluster import prepare_worker, worker_share
from .data import info
from .errors import OptionError
from .defense import Carso
from .flops import per_example, stage_parts
from .models import build_classifier
from .models.hooks import activation_rows as rows_of
from .models.hooks import forward_with_activations
from .models.purifier import PurifierSpec
from .precision import autocast, wrap
from .shards import read_shard_arrays, write_shard
from .sizing import layer_shapes
from .store import sha256_file

MIN_REPS, MAX_REPS = 3, 50
DEFAULT_SECONDS = 2.0   # per unit, after its warm-up
MAX_SECONDS = 600.0

# Which unit times each kind of a stage's work (the keys of pipeline.flops.stage_parts).
STAGE_UNITS = {"classifier": {"train": "classifier_train", "test": "classifier_test"},
               "attacks": {"attack": "attack"},
               "activations": {"forward": "activation_rows"},
               "purifier": {"train_step": "purifier"},
               "evaluate": {"carso": "carso", "classifier_aa": "classifier_aa"},
               "probes": {"probes": "probes"}}


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------
def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_unit(fn, device: str, seconds: float, quick: bool = False) -> list[float]:
    """Seconds of each timed call of ``fn`` after one warm-up call (``quick``: one call, no warm-up)."""
    if not quick:
        fn()
        synchronize(device)
    times: list[float] = []
    while True:
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
        if quick or len(times) >= MAX_REPS or (len(times) >= MIN_REPS and sum(times) >= seconds):
            return times


def measure(fn, flops: int, device: str, seconds: float, quick: bool = False) -> dict:
    times = time_unit(fn, device, seconds, quick)
    median = statistics.median(times)
    return {"seconds": median, "seconds_all": times, "repetitions": len(times), "flops": flops,
            "flop_per_s": flops / median}


def fit_and_measure(setup, n: int, device: str, seconds: float, quick: bool = False) -> dict:
    """Measure ``setup(n)`` (which returns the unit's callable and its FLOPs); on a CUDA out-of-memory error, halve
    the batch and try again, recording every batch that did not fit."""
    too_big = []
    while True:
        try:
            fn, flops = setup(n)
            return {"batch": n, **({"out_of_memory_at": too_big} if too_big else {}),
                    **measure(fn, flops, device, seconds, quick)}
        except torch.OutOfMemoryError:
            pass
        fn = None  # outside the handler, so the failed attempt's tensors are free before the next one
        too_big.append(n)
        torch.cuda.empty_cache()
        if n == 1:
            return {"batch": None, "out_of_memory_at": too_big, "error": "out of memory at every batch size"}
        n //= 2


# --------------------------------------------------------------------------------------------------
# The stages' units
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Unit:
    """One unit of a stage's work: ``setup(n)`` returns (the callable that does it on a batch of ``n``, its FLOPs)."""
    what: str
    precision: str
    flops_by: str      # the per-example counts (pipeline.flops.per_example) the FLOPs are, times the batch
    batch: int
    setup: Callable[[int], tuple[Callable[[], object], int]]

    def measure(self, device: str, seconds: float, quick: bool = False, batch: int | None = None) -> dict:
        n = batch or self.batch
        rec = fit_and_measure(self.setup, n, device, seconds, quick)
        if rec["batch"] != n:
            rec["batch_requested"] = n
        keys = " + ".join(f"['{k}']" for k in self.flops_by.split(" + "))
        return {"what": self.what, "precision": self.precision,
                "flops_counted_by": f"pipeline.flops.per_example{keys} x batch", **rec}


def random_batch(n: int, meta, device: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, meta.channels, meta.size, meta.size, generator=gen)
    y = torch.randint(0, meta.num_classes, (n,), generator=gen)
    return x.to(device), y.to(device)


def build_units(cfg, device: str, ddp=None) -> tuple[dict[str, Unit], dict]:
    """The units of every stage (see the module's docstring) on ``device``, and a description of the models.
    ``ddp``: a wrapper for the purifier unit's model (DistributedDataParallel, in ``measure_purifier_ddp``)."""
    from .adv_train import adversarial_step, build_sgd
    from .purifier_train import build_optimizer, train_step

    meta = info(cfg.data.dataset)
    per = per_example(cfg)
    torch.manual_seed(0)
    clf = build_classifier(cfg.classifier.arch, cfg.data.dataset, cfg.classifier.activation).eval().to(device)
    cached = list(cfg.activations.layers or clf.default_layers())
    layers = list(cfg.purifier.layers or cached)
    shapes = layer_shapes(cfg.classifier.arch, cfg.data.dataset, cfg.classifier.activation, layers)
    t, p, a, ev = cfg.classifier.train, cfg.purifier, cfg.attack, cfg.eval
    spec = PurifierSpec.for_config(cfg, shapes, layers)
    pur = spec.build().to(device)
    models = {"classifier": {"arch": cfg.classifier.arch, "activation": cfg.classifier.activation,
                             "parameters": sum(q.numel() for q in clf.parameters())},
              "purifier": {"conditioning_layers": len(layers), "fc_repr": p.fc_repr, "f_joint": p.f_joint,
                           "parameters": sum(q.numel() for q in pur.parameters())},
              "cached_layers": len(cached)}
    act_dtype = getattr(torch, cfg.activations.dtype)
    acts_rows = cfg.activations.chunk_rows  # one Zarr chunk of every array
    recompute = p.activations_source == "recompute"

    def hooked_forward(inputs, names):  # as the activations stage and pipeline.purifier_train.conditioning
        with torch.no_grad(), autocast(cfg.activations.precision, device):
            _, acts = forward_with_activations(clf, inputs, names)
        return acts

    def pgd_step(precision: str, seed: int):
        """One PGD step on the classifier alone (forward + backward to the input, signed step, projection; the
        random start, drawn once per attack, left out)."""
        attacked = wrap(clf, precision, device)

        def setup(n):
            x, y = random_batch(n, meta, device, seed)
            return (lambda: pgd(attacked, x, y, eps=a.eps, steps=1, step_size=a.pgd_step_size, random_start=False),
                    n * per["classifier_input_grad"])
        return setup

    def classifier_train(n):
        model = copy.deepcopy(clf)  # its own copy: training moves the weights and leaves it in train mode
        opt = build_sgd(model, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
        x, y = random_batch(n, meta, device, 6)
        gen = torch.Generator().manual_seed(t.seed)
        return (lambda: adversarial_step(model, opt, x, y, eps=t.eps, pgd_steps=t.pgd_steps,
                                         pgd_step_size=t.pgd_step_size, generator=gen),
                n * (t.pgd_steps * per["classifier_input_grad"] + per["classifier_train_step"]))

    def activations(n):
        x, _ = random_batch(n, meta, device, 2)
        return lambda: hooked_forward(x, cached), n * per["classifier_forward"]

    def activation_rows(n):
        """As the activations stage's worker does a shard: check its sha256, read it, the hooked forward, the copy
        to the host and the cast, the rows compressed into Zarr arrays on disk (a temporary folder) and the chunk
        files hashed for the unit's receipt."""
        x, y = random_batch(n, meta, "cpu", 10)
        tmp = tempfile.TemporaryDirectory(prefix="calibrate-")  # removed with the unit's callable
        path = Path(tmp.name) / "shard.tar"
        write_shard(path, ((i, int(y[i]), KINDS[i % len(KINDS)], x[i].numpy()) for i in range(n)))
        shapes = {name: tuple(v.shape[1:]) for name, v in zip(cached, hooked_forward(x[:1].to(device), cached))}
        root = Path(tmp.name) / "out"
        zarr_store.create(root, n_rows=n, shapes=shapes, dtype=cfg.activations.dtype, chunk_rows=n,
                          clevel=cfg.activations.clevel, attrs={})
        files = [f for name, shape in shapes.items() for f in zarr_store.chunk_files(root, name, 1 + len(shape), 0, 1)]
        files += [f for name in zarr_store.META_ARRAYS for f in zarr_store.chunk_files(root, name, 1, 0, 1)]
        acts = cfg.activations

        def rows():
            sha256_file(path)
            data = read_shard_arrays(path)
            out = rows_of(clf, data["image"], cached, batch_size=acts.batch_size, dtype=acts.dtype,
                          precision=acts.precision, device=device)
            kinds = np.array([KINDS.index(k) for k in data["kind"]], dtype=np.uint8)
            zarr_store.write_rows(root, 0, {**out, "label": data["label"], "kind": kinds, "index": data["index"]})
            for f in files:  # the unit's receipt: every chunk file's size and sha256, read back from the disk
                sha256_file(f)
            return tmp

        return rows, n * per["classifier_forward"]

    def purifier(n):
        model = copy.deepcopy(pur)
        if ddp is not None:
            model = ddp(model)
        opt = build_optimizer(model, p)
        x, _ = random_batch(n, meta, device, 3)
        target, _ = random_batch(n, meta, device, 4)

        def conditioning():
            return [t.to(act_dtype) for t in hooked_forward(x, layers)]

        cond = None if recompute else conditioning()
        model.train()

        def step():
            train_step(model, opt, x, target, conditioning() if recompute else cond, p.beta_max, p.precision)

        return step, n * (per["purifier_train_step"] + (per["classifier_forward"] if recompute else 0))

    def carso(n):
        x, y = random_batch(n, meta, device, 5)
        # Its own copies: Carso freezes the classifier's and the purifier's parameters and puts both in eval mode,
        # as the evaluation has them.
        model = Carso(copy.deepcopy(clf), copy.deepcopy(pur), layers, samples=ev.samples, aggregation=ev.aggregation,
                      precision=ev.precision, kernels=ev.kernels)
        return lambda: input_gradient(model, x, y), n * per["carso_input_grad"]

    units = {
        "classifier_train": Unit(
            f"one step of the classifier's adversarial training: PGD-{t.pgd_steps} (eval mode), forward, backward, "
            "SGD step", "float32", "classifier_input_grad x pgd_steps + classifier_train_step", t.batch_size,
            classifier_train),
        "classifier_test": Unit("one PGD step of the classifier's test evaluation", "float32",
                                "classifier_input_grad", t.eval_batch_size, pgd_step("float32", 7)),
        "attack": Unit("one PGD step of the attacks stage: classifier forward + backward to the input, signed step, "
                       "projection", a.precision, "classifier_input_grad", a.batch_size,
                       pgd_step(a.precision, 1)),
        "activations": Unit(f"the activations stage's forward: the classifier with hooks on {len(cached)} layers, no "
                            "gradients", cfg.activations.precision, "classifier_forward", cfg.activations.batch_size,
                            activations),
        "activation_rows": Unit(
            f"the activations stage's work on {acts_rows} rows: the shard's sha256 and its reading, the hooked forward "
            f"({len(cached)} layers, no gradients), the copy to the host, the cast to {cfg.activations.dtype}, the "
            "Zarr compression and write to disk, the chunks' sha256", cfg.activations.precision, "classifier_forward",
            acts_rows, activation_rows),
        "purifier": Unit(f"one purifier training step on one worker's batch (activations: {p.activations_source}): "
                         "forward, VAE loss, backward, RAdam + Lookahead step", p.precision,
                         "purifier_train_step" + (" + classifier_forward" if recompute else ""),
                         max(1, p.batch_size // p.workers), purifier),
        "carso": Unit(f"one CARSO input gradient over a chunk of points x {ev.samples} samples ({ev.aggregation} "
                      "aggregation): classifier, purifier decoder, classifier on every reconstruction, backward to "
                      "the input", ev.precision, "carso_input_grad", ev.chunk_size, carso),
        "classifier_aa": Unit("one PGD step on the classifier alone over a chunk (standard AutoAttack's rate)",
                              "float32", "classifier_input_grad", max(1, min(ev.chunk_size, ev.batch_size)),
                              pgd_step("float32", 8)),
        "probes": Unit("one PGD step on the classifier alone (the probes' attacks)", "float32",
                       "classifier_input_grad", max(1, min(cfg.probes.batch_size, cfg.probes.n_examples)),
                       pgd_step("float32", 9)),
    }
    return units, models


def _purifier_ddp_worker(rank: int, world: int, init: str, cfg, threads: int, seconds: float, results) -> None:
    """One of ``world`` processes timing the purifier unit as the stage's workers run it: DDP over gloo (Ray
    Train's backend on CPU), ``threads`` each, all at once. Rank 0 decides when to stop (every rank must do the
    same number of steps) and puts its times on ``results``."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    prepare_worker(threads)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        units, _ = build_units(cfg, "cpu", ddp=DistributedDataParallel)
        fn, flops = units["purifier"].setup(units["purifier"].batch)
        fn()  # warm-up
        times, go = [], torch.ones(1)
        while go.item():
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
            go.fill_(0 if len(times) >= MAX_REPS or (len(times) >= MIN_REPS and sum(times) >= seconds) else 1)
            dist.broadcast(go, 0)
        if rank == 0:
            results.put((times, flops))
        dist.barrier()  # every rank is done with the group before rank 0, which hosts its store, tears it down
    finally:
        dist.destroy_process_group()


def measure_purifier_ddp(cfg, workers: int, threads: int, seconds: float) -> dict:
    """The purifier unit timed in the stage's own layout on CPU: ``workers`` processes at once, DDP over gloo, each
    at ``threads`` threads (so the gradients' all-reduce and the workers' contention for the cores' caches and
    memory are in it). ``startup_s``: the seconds the processes took to start, import, build their models, join
    the process group and warm up (the projection adds them to the stage's: its workers start the same way, Ray
    Train's own bookkeeping aside)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    t0 = time.perf_counter()
    try:
        mp.start_processes(_purifier_ddp_worker, args=(workers, f"tcp://127.0.0.1:{port}", cfg, threads, seconds,
                                                       results), nprocs=workers, join=True, start_method="spawn")
    except mp.ProcessExitedException:
        # A worker that dies after rank 0 recorded the times (gloo's threads at exit; seen once, SIGABRT in
        # a loaded CI run) leaves a whole measurement; one that dies before it leaves none, and that is an error.
        if results.empty():
            raise
    times, flops = results.get()
    median = statistics.median(times)
    return {"batch": max(1, cfg.purifier.batch_size // workers), "seconds": median, "seconds_all": times,
            "repetitions": len(times), "flops": flops, "flop_per_s": flops / median,
            "layout": f"{workers} processes at once, DDP over gloo, {threads} thread(s) each",
            "startup_s": time.perf_counter() - t0 - sum(times)}


# --------------------------------------------------------------------------------------------------
# Projection
# --------------------------------------------------------------------------------------------------
def this_machine() -> dict:
    """What the stages of a local run would get here: the device, the CPUs (a local Ray instance's num_cpus) and
    the GPUs."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return {"device": "cuda" if gpus else "cpu", "cpus": os.cpu_count() or 1, "gpus": gpus}


def stage_workers(cfg, work: dict, gpus: int, cpus: int) -> dict[str, int]:
    """Concurrent workers of each stage on a machine with ``gpus`` GPUs and ``cpus`` CPUs, by the stages' own rules
    (``--workers`` not given): the classifier one task; attacks and activations one actor per GPU (one on every
    core without), at most one per shard; the purifier ``purifier.workers``; evaluate and probes one task per GPU
    or per core, at most one per chunk or layer."""
    shards = max(1, math.ceil(work["examples"] / cfg.attack.shard_size))
    chunks = max(1, math.ceil(work["n_eval"] / cfg.eval.chunk_size))
    per_unit = gpus or cpus
    return {"classifier": 1, "attacks": min(max(1, gpus), shards), "activations": min(max(1, gpus), shards),
            "purifier": cfg.purifier.workers, "evaluate": max(1, min(per_unit, chunks)),
            "probes": max(1, min(per_unit, work.get("probe_layers", 1)))}


def check_seconds(seconds) -> float:
    if not isinstance(seconds, (int, float)) or not math.isfinite(seconds) or not 0 < seconds <= MAX_SECONDS:
        raise OptionError(f"--calibrate-seconds {seconds}: must be a number of seconds above 0 and at most "
                          f"{MAX_SECONDS:g}")
    return float(seconds)


def project(cfg, work: dict, seconds: float = DEFAULT_SECONDS, machine: dict | None = None,
            stages: list[str] | None = None) -> dict:
    """Time the units the stages need on this machine and project each stage's seconds (see the docstring).
    Returns ``{"machine", "seconds_per_unit", "units": {name@threads: measurement}, "stages": {stage: {"flops",
    "seconds", "flop_per_s" (the stage's FLOPs / its projected seconds), "workers", "threads", "device",
    "parts": {part: {"unit", "flops", "flop_per_s" (one worker's)}}}}}``."""
    seconds = check_seconds(seconds)
    machine = machine or this_machine()
    device = machine["device"]
    parts = stage_parts(cfg, work)
    workers = stage_workers(cfg, work, machine["gpus"], machine["cpus"])
    units, _ = build_units(cfg, device)
    before = torch.get_num_threads()
    measured: dict[str, dict] = {}
    out: dict[str, dict] = {}
    try:
        for stage in stages or list(STAGE_UNITS):
            threads = int(worker_share(workers[stage], machine["gpus"], machine["cpus"])["num_cpus"])
            rec = {"flops": sum(parts[stage].values()), "workers": workers[stage], "threads": threads,
                   "device": device, "parts": {}}
            worker_seconds = 0.0
            for part, flops in parts[stage].items():
                if not flops:
                    continue
                name = STAGE_UNITS[stage][part]
                tag = f"{name}@{threads}"
                if tag not in measured:
                    prepare_worker(threads)  # the threads (and malloc thresholds) one of the stage's workers has
                    if name == "purifier" and device == "cpu" and workers[stage] > 1:
                        rec_unit = {"what": units[name].what, "precision": units[name].precision,
                                    **measure_purifier_ddp(cfg, workers[stage], threads, seconds)}
                    else:
                        rec_unit = units[name].measure(device, seconds)
                    measured[tag] = {"unit": name, "threads": threads, "device": device, **rec_unit}
                m = measured[tag]
                if "error" in m:
                    raise RuntimeError(f"calibration of {name}: {m['error']}")
                rec["parts"][part] = {"unit": name, "flops": flops, "flop_per_s": m["flop_per_s"],
                                      **{k: m[k] for k in ("layout", "startup_s") if k in m}}
                worker_seconds += flops / m["flop_per_s"] + m.get("startup_s", 0.0) * workers[stage]
            rec["seconds"] = worker_seconds / workers[stage]
            rec["flop_per_s"] = rec["flops"] / rec["seconds"] if rec["seconds"] > 0 else None
            out[stage] = rec
    finally:
        torch.set_num_threads(before)
    return {"machine": machine, "seconds_per_unit": seconds, "units": measured, "stages": out}
