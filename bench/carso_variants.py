"""The CARSO input gradient (every evaluation attack step is one) in each execution variant, side by side in one
run: float32 as written (``eval.kernels: reference``), channels-last memory format, ``eval.kernels: fast``
(channels-last with the purifier's BatchNorms folded: the evaluation's default), bfloat16 autocast (opt-in,
``eval.precision: bfloat16``), ``torch.compile`` (inductor) of the float32 model and of the fast one
(``fast_compile``), and the thread layout (one process with T threads).

Each variant is timed on the same inputs, the same random weights (the cost does not depend on them) and the same
latent draws (the generator is reseeded before each call), on the config's models at ``eval.chunk_size`` points x
``eval.samples`` reconstructions, and compared with the float32 baseline: speed-up, and the largest difference of
its input gradient from the baseline's (0 means the same numbers; channels-last and compiled kernels may sum in
another order; bfloat16 rounds). Prints JSON.

    .venv/bin/python bench/carso_variants.py [--config configs/fmnist.yaml] [--threads 2] [--seconds 3]
        [--variants fp32,channels_last,fast,bf16,compile,fast_compile] [--points 50]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from pipeline.attacks import input_gradient
from pipeline.config import load_config
from pipeline.data import info
from pipeline.defense import Carso
from pipeline.flops import per_example
from pipeline.models import build_classifier
from pipeline.models.purifier import PurifierSpec
from pipeline.sizing import layer_shapes

VARIANTS = ("fp32", "channels_last", "fast", "bf16", "compile", "fast_compile")


def build(cfg, precision: str, kernels: str = "reference"):
    torch.manual_seed(0)
    clf = build_classifier(cfg.classifier.arch, cfg.data.dataset, cfg.classifier.activation).eval()
    layers = list(cfg.purifier.layers or cfg.activations.layers or clf.default_layers())
    shapes = layer_shapes(cfg.classifier.arch, cfg.data.dataset, cfg.classifier.activation, layers)
    pur = PurifierSpec.for_config(cfg, shapes, layers).build().eval()
    return Carso(clf, pur, layers, samples=cfg.eval.samples, aggregation=cfg.eval.aggregation, precision=precision,
                 kernels=kernels)


def timed(fn, seconds: float) -> tuple[float, torch.Tensor]:
    out = fn()  # warm-up (and, for compile, the compilation)
    times = []
    t_end = time.perf_counter() + seconds
    while len(times) < 3 or (time.perf_counter() < t_end and len(times) < 30):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/fmnist.yaml")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--points", type=int, default=None, help="points per call (default eval.chunk_size)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    n = args.points or cfg.eval.chunk_size
    meta = info(cfg.data.dataset)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(n, meta.channels, meta.size, meta.size, generator=g)
    y = torch.randint(0, meta.num_classes, (n,), generator=g)
    flops = n * per_example(cfg)["carso_input_grad"]

    def call(model, xin):
        def fn():
            torch.manual_seed(7)  # the same latent draws in every variant
            return input_gradient(model, xin, y)
        return fn

    results, base = {}, None
    for name in args.variants.split(","):
        t0 = time.perf_counter()
        model = build(cfg, "bfloat16" if name == "bf16" else "float32", "fast" if name in ("fast", "fast_compile") else "reference")
        xin = x
        if name == "channels_last":
            model = model.to(memory_format=torch.channels_last)
            xin = x.contiguous(memory_format=torch.channels_last)
        if name in ("compile", "fast_compile"):
            model = torch.compile(model)
        seconds, grad = timed(call(model, xin), args.seconds)
        rec = {"seconds_per_call": round(seconds, 4), "ms_per_point": round(1000 * seconds / n, 3),
               "gflops_per_s": round(flops / seconds / 1e9, 1), "setup_and_warmup_s": round(time.perf_counter() - t0 - seconds, 1)}
        if base is None:
            base = (seconds, grad.float())
        else:
            rec["speedup_vs_fp32"] = round(base[0] / seconds, 3)
            rec["max_abs_grad_diff_vs_fp32"] = float((grad.float() - base[1]).abs().max())
        results[name] = rec
    print(json.dumps({"config": args.config, "threads": args.threads, "points": n, "samples": cfg.eval.samples,
                      "flops_per_call": flops, "variants": results}, indent=1))


if __name__ == "__main__":
    main()
