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

The units are the library's (``pipeline.calibrate.build_units``, which ``pipeline plan --calibrate`` times too).
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
import time

import torch

from pipeline.calibrate import build_units, measure
from pipeline.cluster import prepare_worker
from pipeline.config import load_config
from pipeline.flops import _count

UNITS = ("attack", "purifier", "carso", "activations")  # of pipeline.calibrate.build_units


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


def run_units(cfg, device: str, batches: dict[str, int], seconds: float, quick: bool) -> tuple[dict, dict]:
    """The four units (pipeline.calibrate, which the plan's --calibrate times too), each at its stage's batch
    unless ``batches`` names another."""
    units, models = build_units(cfg, device)
    return {name: units[name].measure(device, seconds, quick, batches.get(name)) for name in UNITS}, models


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
    batches = parse_batches(args.batch)
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
