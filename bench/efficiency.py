"""How close each stage's unit of work comes to this machine's matrix-product peak, in one run.

Four units, each on the config's own models (built as the stages build them, random weights: the cost does not
depend on them) at the stage's own batch size and precision:

- ``attack``: one PGD step of the attacks stage on a batch (``attack.batch_size``): the classifier's forward and
  backward to the input, then the signed step and the projection (``pipeline.attacks.pgd`` with one step).
- ``purifier``: one purifier training step on one worker's batch (``purifier.batch_size / purifier.workers``):
  forward, VAE loss, backward and the RAdam + Lookahead step (``pipeline.purifier_train.train_step``). The
  conditioning activations are made once beforehand, as the cache gives them (``activations.dtype``); with
  ``purifier.activations_source: recompute`` the classifier's forward is part of the unit, as in the stage.
- ``carso``: one CARSO input gradient over a chunk of the evaluation (``eval.chunk_size`` points x
  ``eval.samples`` reconstructions): the gradient of the aggregated cross-entropy to the input through
  classifier, purifier and classifier again (every attack step of the evaluation is one).
- ``activations``: the activations stage's forward on a batch (``activations.batch_size``): the classifier with
  hooks on the cached layers, without gradients (the copy to the host is left out).

Beside them, the peaks the ratios refer to: a square float32 matrix product on the same threads and device, and
a bfloat16 one where the CPU (AVX512-BF16 or AMX) or the GPU supports it; on CUDA also a TF32 one, since cuDNN
runs float32 convolutions in TF32 by default (so a convolution-heavy unit can pass the float32 "peak"). Each is
measured before and after the units and the faster of the two is the peak (the gap shows other load or drift).

Each unit and product runs once to warm up, then repeatedly until ``--seconds`` have passed (at least 3 times, at
most 50); its time is the median. ``--quick`` times one call without a warm-up (a check that the path runs, not a
measurement). FLOPs are ``pipeline.flops.per_example`` times the unit's examples: convolutions and matrix products
only (torch's FlopCounterMode), so elementwise work, the loss and the optimizer step count zero and the achieved
FLOP/s are lower bounds. The matrix products are counted by the same FlopCounterMode (2 n^3).

On CUDA, a unit whose batch does not fit in the GPU's memory is retried at half the batch (``out_of_memory_at``
lists the sizes that did not fit, ``batch_requested`` the one asked for).

    .venv/bin/python bench/efficiency.py [--config configs/fmnist.yaml] [--device cpu|cuda] [--threads N]
        [--batch attack=500,purifier=128,carso=50,activations=250] [--set eval.samples=2] [--seconds 2]
        [--gemm-n 2048] [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

from pipeline.attacks import input_gradient, pgd
from pipeline.cluster import prepare_worker
from pipeline.config import load_config
from pipeline.data import info
from pipeline.defense import Carso
from pipeline.flops import _count, per_example
from pipeline.models import build_classifier
from pipeline.models.hooks import forward_with_activations
from pipeline.models.purifier import PurifierSpec
from pipeline.precision import autocast, wrap
from pipeline.purifier_train import build_optimizer, train_step
from pipeline.sizing import layer_shapes

UNITS = ("attack", "purifier", "carso", "activations")
MIN_REPS, MAX_REPS = 3, 50


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------
def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_unit(fn, device: str, seconds: float, quick: bool) -> list[float]:
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


def measure(fn, flops: int, device: str, seconds: float, quick: bool) -> dict:
    times = time_unit(fn, device, seconds, quick)
    median = statistics.median(times)
    return {"seconds": median, "seconds_all": times, "repetitions": len(times), "flops": flops,
            "flop_per_s": flops / median}


# --------------------------------------------------------------------------------------------------
# Peaks: square matrix products
# --------------------------------------------------------------------------------------------------
def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def bf16_support(device: str) -> str | None:
    """None when the device computes bfloat16 natively, else why the bfloat16 product is skipped."""
    if device == "cuda":
        return None if torch.cuda.is_bf16_supported() else "this GPU has no native bfloat16"
    flags = cpu_flags()
    if flags & {"avx512_bf16", "amx_bf16"}:
        return None
    return "the CPU has neither avx512_bf16 nor amx_bf16 (/proc/cpuinfo flags)"


def peak_plan(device: str) -> tuple[dict, dict]:
    """The matrix products to measure ({name: (dtype, tf32)}) and the ones skipped ({name: why})."""
    plan = {"gemm_float32": (torch.float32, False)}
    if device == "cuda":
        plan["gemm_tf32"] = (torch.float32, True)
    reason = bf16_support(device)
    if reason is not None:
        return plan, {"gemm_bfloat16": reason}
    plan["gemm_bfloat16"] = (torch.bfloat16, False)
    return plan, {}


def gemm(n: int, dtype: torch.dtype, tf32: bool, device: str, seconds: float, quick: bool) -> dict:
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    with torch.device("meta"):
        flops = _count(lambda: torch.mm(torch.empty(n, n, dtype=dtype), torch.empty(n, n, dtype=dtype)))
    if device != "cuda":
        return measure(lambda: torch.mm(a, b), flops, device, seconds, quick)
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        return measure(lambda: torch.mm(a, b), flops, device, seconds, quick)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def measure_peaks(plan: dict, n: int, device: str, seconds: float, quick: bool) -> dict:
    return {name: gemm(n, dtype, tf32, device, seconds, quick) for name, (dtype, tf32) in plan.items()}


def combine_peaks(plan: dict, n: int, before: dict, after: dict) -> dict:
    """Each product's peak: the faster of its measurements before and after the units (other load on the machine
    or a clock that drifts shows as a gap between the two)."""
    return {name: {"n": n, "dtype": str(dtype).removeprefix("torch."), **({"tf32": True} if tf32 else {}),
                   "flops": before[name]["flops"],
                   "flop_per_s": max(before[name]["flop_per_s"], after[name]["flop_per_s"]),
                   "before": before[name], "after": after[name]}
            for name, (dtype, tf32) in plan.items()}


# --------------------------------------------------------------------------------------------------
# The stages' units
# --------------------------------------------------------------------------------------------------
def parse_batches(text: str | None) -> dict[str, int]:
    out: dict[str, int] = {}
    for part in filter(None, (text or "").split(",")):
        key, _, value = part.partition("=")
        if key not in UNITS or not value.isdigit() or int(value) < 1:
            raise SystemExit(f"--batch: {part!r} is not UNIT=N with UNIT one of {', '.join(UNITS)} and N >= 1")
        out[key] = int(value)
    return out


def default_batches(cfg) -> dict[str, int]:
    return {"attack": cfg.attack.batch_size, "purifier": max(1, cfg.purifier.batch_size // cfg.purifier.workers),
            "carso": cfg.eval.chunk_size, "activations": cfg.activations.batch_size}


def random_batch(n: int, meta, device: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, meta.channels, meta.size, meta.size, generator=gen)
    y = torch.randint(0, meta.num_classes, (n,), generator=gen)
    return x.to(device), y.to(device)


def fit_and_measure(setup, n: int, device: str, seconds: float, quick: bool) -> dict:
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


def run_units(cfg, device: str, batches: dict[str, int], seconds: float, quick: bool) -> tuple[dict, dict]:
    meta = info(cfg.data.dataset)
    per = per_example(cfg)
    torch.manual_seed(0)
    clf = build_classifier(cfg.classifier.arch, cfg.data.dataset, cfg.classifier.activation).eval().to(device)
    cached = list(cfg.activations.layers or clf.default_layers())
    layers = list(cfg.purifier.layers or cached)
    shapes = layer_shapes(cfg.classifier.arch, cfg.data.dataset, cfg.classifier.activation, layers)
    p, a, ev = cfg.purifier, cfg.attack, cfg.eval
    spec = PurifierSpec(image_shape=(meta.channels, meta.size, meta.size),
                        layer_shapes=tuple((k, tuple(shapes[k])) for k in layers), fc_repr=p.fc_repr,
                        f_joint=p.f_joint, encoder_convs=p.encoder_convs, mean=tuple(meta.mean), std=tuple(meta.std))
    pur = spec.build().to(device)
    models = {"classifier": {"arch": cfg.classifier.arch, "activation": cfg.classifier.activation,
                             "parameters": sum(q.numel() for q in clf.parameters())},
              "purifier": {"conditioning_layers": len(layers), "fc_repr": p.fc_repr, "f_joint": p.f_joint,
                           "parameters": sum(q.numel() for q in pur.parameters())},
              "cached_layers": len(cached)}
    act_dtype = getattr(torch, cfg.activations.dtype)
    recompute = p.activations_source == "recompute"

    def hooked_forward(inputs, names):  # as the activations stage and pipeline.purifier_train.conditioning
        with torch.no_grad(), autocast(cfg.activations.precision, device):
            _, acts = forward_with_activations(clf, inputs, names)
        return acts

    # (a) attacks: one PGD step (forward + backward to the input, signed step, projection) at attack.batch_size.
    attacked = wrap(clf, a.precision, device)

    def attack(n):
        x, y = random_batch(n, meta, device, 1)
        return (lambda: pgd(attacked, x, y, eps=a.eps, steps=1, step_size=a.pgd_step_size, random_start=False),
                n * per["classifier_input_grad"])

    # (d) activations: the hooked forward without gradients at activations.batch_size.
    def activations(n):
        x, _ = random_batch(n, meta, device, 2)
        return lambda: hooked_forward(x, cached), n * per["classifier_forward"]

    # (b) purifier: one training step (forward, VAE loss, backward, RAdam + Lookahead) on one worker's batch.
    opt = build_optimizer(pur, p)

    def purifier(n):
        x, _ = random_batch(n, meta, device, 3)
        target, _ = random_batch(n, meta, device, 4)

        def conditioning():
            return [t.to(act_dtype) for t in hooked_forward(x, layers)]

        cond = None if recompute else conditioning()
        pur.train()

        def step():
            train_step(pur, opt, x, target, conditioning() if recompute else cond, p.beta_max, p.precision)

        return step, n * (per["purifier_train_step"] + (per["classifier_forward"] if recompute else 0))

    # (c) carso: one input gradient over a chunk x eval.samples reconstructions.
    def carso(n):
        x, y = random_batch(n, meta, device, 5)
        # Built here, after the other units: Carso freezes the classifier's and the purifier's parameters and puts
        # both in eval mode, as the evaluation has them.
        model = Carso(clf, pur, layers, samples=ev.samples, aggregation=ev.aggregation, precision=ev.precision)
        return lambda: input_gradient(model, x, y), n * per["carso_input_grad"]

    plan = [
        ("attack", attack, a.precision, "classifier_input_grad",
         "one PGD step of the attacks stage: classifier forward + backward to the input, signed step, projection"),
        ("activations", activations, cfg.activations.precision, "classifier_forward",
         f"the activations stage's forward: the classifier with hooks on {len(cached)} layers, no gradients"),
        ("purifier", purifier, p.precision,
         "purifier_train_step" + (" + classifier_forward" if recompute else ""),
         f"one purifier training step on one worker's batch (activations: {p.activations_source}): forward, "
         "VAE loss, backward, RAdam + Lookahead step"),
        ("carso", carso, ev.precision, "carso_input_grad",
         f"one CARSO input gradient over a chunk of points x {ev.samples} samples ({ev.aggregation} aggregation): "
         "classifier, purifier decoder, classifier on every reconstruction, backward to the input"),
    ]
    units: dict[str, dict] = {}
    for name, setup, precision, per_key, what in plan:
        rec = fit_and_measure(setup, batches[name], device, seconds, quick)
        if rec["batch"] != batches[name]:
            rec["batch_requested"] = batches[name]
        keys = " + ".join(f"['{k}']" for k in per_key.split(" + "))
        units[name] = {"what": what, "precision": precision,
                       "flops_counted_by": f"pipeline.flops.per_example{keys} x batch", **rec}
    return units, models


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------
def machine(device: str, threads: int) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    out = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": threads, "torch": torch.__version__,
           "cpu_capability": torch.backends.cpu.get_cpu_capability(), "device": device,
           "loadavg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    if device == "cuda":
        out |= {"gpu": torch.cuda.get_device_name(0), "cuda": torch.version.cuda,
                "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
                "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/fmnist.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config override, as the CLI's --set (repeatable)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--batch", help="UNIT=N,...: batch sizes instead of the config's (units: " + ", ".join(UNITS) + ")")
    ap.add_argument("--seconds", type=float, default=2.0, help="time per unit and peak, after the warm-up")
    ap.add_argument("--gemm-n", type=int, default=None, help="matrix size of the peaks (2048 on CPU, 8192 on CUDA)")
    ap.add_argument("--quick", action="store_true", help="one timed call per unit and peak, no warm-up (for tests)")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda.is_available() is False")
    prepare_worker(args.threads)  # threads and malloc thresholds, as every stage worker sets them
    cfg = load_config(args.config, args.overrides)
    batches = default_batches(cfg) | parse_batches(args.batch)
    gemm_n = args.gemm_n or (8192 if args.device == "cuda" else 2048)

    host = machine(args.device, torch.get_num_threads())
    t0 = time.perf_counter()
    plan, skipped = peak_plan(args.device)
    before = measure_peaks(plan, gemm_n, args.device, args.seconds, args.quick)
    units, models = run_units(cfg, args.device, batches, args.seconds, args.quick)
    measured = combine_peaks(plan, gemm_n, before, measure_peaks(plan, gemm_n, args.device, args.seconds, args.quick))
    for rec in units.values():
        if "flop_per_s" in rec:
            rec["ratio"] = {name: rec["flop_per_s"] / peak["flop_per_s"] for name, peak in measured.items()}
    print(json.dumps({"config": args.config, "overrides": args.overrides, "quick": args.quick,
                      "machine": host, "models": models,
                      "peaks": measured, "peaks_skipped": skipped, "units": units,
                      "wall_s": time.perf_counter() - t0}, indent=1))


if __name__ == "__main__":
    main()
