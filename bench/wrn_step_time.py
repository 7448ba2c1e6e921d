"""One PGD-7 adversarial-training step (batch 128, Fashion-MNIST 28x28x1) per classifier size, on this machine's
threads: how configs/fmnist_wrn.yaml's size was chosen (the classifier stage runs 2 epochs = 938 such steps plus
PGD-20 on the 10,000 test points). Random images: a step's time does not depend on them. Prints JSON.

    .venv/bin/python bench/wrn_step_time.py [--archs cnn,wrn-16-1,wrn-16-2] [--threads 2] [--steps 4]
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from pipeline.attacks import pgd
from pipeline.cluster import prepare_worker
from pipeline.flops import _count
from pipeline.models import build_classifier


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--archs", default="cnn,wrn-16-1,wrn-22-1,wrn-16-2,wrn-22-2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=128)
    a = ap.parse_args()
    prepare_worker(a.threads)
    rows = []
    for arch in a.archs.split(","):
        model = build_classifier(arch, "fmnist", "swish")
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        gen = torch.Generator().manual_seed(0)
        x, y = torch.rand(a.batch, 1, 28, 28, generator=gen), torch.randint(0, 10, (a.batch,), generator=gen)
        times = []
        for _ in range(a.steps + 1):  # the first step warms up and is not counted
            t0 = time.perf_counter()
            model.eval()
            xa = pgd(model, x, y, eps=0.1, steps=7, step_size=0.035, generator=gen)
            model.train()
            loss = F.cross_entropy(model(xa), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t0)
        step = min(times[1:])
        model.eval()
        rows.append({"arch": arch, "params": sum(p.numel() for p in model.parameters()),
                     "forward_flops_per_example": _count(lambda: model(x[:1])),
                     "step_s": round(step, 4), "epoch_60k_min": round(step * 469 / 60, 1),
                     "two_epochs_min": round(2 * step * 469 / 60, 1)})
        print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"threads": a.threads, "batch": a.batch, "steps_timed": a.steps, "rows": rows}))


if __name__ == "__main__":
    main()
