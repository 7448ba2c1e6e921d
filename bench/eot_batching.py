"""PGD+EOT's gradient with its EOT draws batched, against the draws one by one (``pipeline.attacks.input_gradient``),
side by side in one run. Tried for issue 27 and not kept (see bench/README.md): it is measured here so that the
finding can be re-checked on other hardware.

A PGD+EOT step averages the input gradient over ``eot`` independent CARSO passes. Run one by one, every pass runs
the classifier on the input and the purifier's condition encoder again. Batched, a group of ``k`` draws shares one
classifier pass and one condition encoding (forward and backward) and decodes ``k x samples x points``
reconstructions in one call; each draw's latent z is still drawn by its own ``randn`` call, so the numbers are the
sequential ones up to the order of floating-point sums (printed: the largest gradient difference, and how many
gradient signs, which is all PGD uses, differ).

Timed on the config's models (random weights: the cost does not depend on them) at ``eval.chunk_size`` points x
``eval.samples`` reconstructions, for each group size and both ``eval.kernels``. Prints JSON.

    .venv/bin/python bench/eot_batching.py [--config configs/fmnist_carso.yaml] [--threads 1] [--groups 1,2,4,5,10,20]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from pipeline.attacks import input_gradient
from pipeline.config import load_config
from pipeline.data import info
from pipeline.defense import aggregate
from pipeline.models.hooks import capture
from pipeline.precision import autocast

from carso_variants import build


def batched_eot_gradient(model, x: torch.Tensor, y: torch.Tensor, eot: int, group: int) -> torch.Tensor:
    """``input_gradient(model, x, y, eot)`` with the draws in groups of ``group`` (the same latent stream)."""
    b, pur = x.shape[0], model.purifier
    grad, done = torch.zeros_like(x), 0
    while done < eot:
        k = min(group, eot - done)
        xr = x.detach().requires_grad_(True)
        xin = xr.contiguous(memory_format=torch.channels_last) if model.kernels == "fast" else xr
        with autocast(model.precision, x.device):
            with capture(model.classifier, model.layers) as acts:
                model.classifier(xin)
            cond = pur.encode_condition([acts[n] for n in model.layers])
            z = torch.cat([torch.randn(model.samples * b, pur.f_joint, dtype=cond.dtype) for _ in range(k)])
            rec = pur.decode(z, cond.repeat(model.samples * k, 1))
            logits = model.classifier(rec).float().view(k, model.samples, b, -1)
        per_draw = logits.transpose(0, 1).reshape(model.samples, k * b, -1)
        loss = F.cross_entropy(aggregate(per_draw, model.aggregation), y.repeat(k), reduction="sum")
        grad += torch.autograd.grad(loss, xr)[0]
        done += k
    return grad / eot


def timed(fn, rounds: int) -> tuple[float, torch.Tensor]:
    out = fn()  # warm-up
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/fmnist_carso.yaml")
    ap.add_argument("--threads", type=int, default=1, help="an evaluation worker's threads (default 1)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--groups", default="1,2,4,5,10,20")
    ap.add_argument("--points", type=int, default=None, help="points per call (default eval.chunk_size)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    n, eot = args.points or cfg.eval.chunk_size, cfg.eval.pgd_eot_iters
    meta = info(cfg.data.dataset)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(n, meta.channels, meta.size, meta.size, generator=g)
    y = torch.randint(0, meta.num_classes, (n,), generator=g)
    groups = [int(k) for k in args.groups.split(",")]
    out = {}
    for kernels in ("reference", "fast"):
        model = build(cfg, cfg.eval.precision, kernels)

        def sequential():
            torch.manual_seed(7)
            return input_gradient(model, x, y, eot=eot)

        base_s, base_g = timed(sequential, args.rounds)
        rows = {"sequential": {"seconds_per_gradient": round(base_s, 4)}}
        for k in groups:
            def batched(k=k):
                torch.manual_seed(7)
                return batched_eot_gradient(model, x, y, eot, k)
            s, grad = timed(batched, args.rounds)
            rows[f"group_{k}"] = {"seconds_per_gradient": round(s, 4), "speedup_vs_sequential": round(base_s / s, 3),
                                  "max_abs_grad_diff": float((grad - base_g).abs().max()),
                                  "sign_differences": int((grad.sign() != base_g.sign()).sum())}
        out[kernels] = rows
    print(json.dumps({"config": args.config, "threads": args.threads, "points": n, "samples": cfg.eval.samples,
                      "eot": eot, "rounds": args.rounds, "kernels": out}, indent=1))


if __name__ == "__main__":
    main()
