"""How the evaluation's cost per point depends on the batch it attacks at once (eval.chunk_size).

Every attack step of the evaluation is one CARSO input gradient over the chunk's points x N reconstructions
(AutoAttack and PGD+EOT attack a chunk as one batch). This times that gradient for several chunk sizes on the
same models, in one run, and prints JSON with the seconds per point-gradient and each size's speed-up over the
first. Models: the default config's SmallCNN and conv3 purifier at random weights (the cost does not depend on
the weights). The process is set up as an evaluation worker is (``pipeline.cluster.prepare_worker``: threads and
glibc malloc's thresholds); ``--unpinned`` leaves malloc as glibc starts it, to measure what the thresholds save.

    python bench/evaluate_batch.py [--threads 1] [--sizes 5,10,25,50] [--samples 8] [--repeats 5] [--unpinned]
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from pipeline.cluster import prepare_worker
from pipeline.defense import Carso
from pipeline.models.cnn import SmallCNN
from pipeline.models.purifier import Purifier


def models(samples: int) -> Carso:
    torch.manual_seed(0)
    clf = SmallCNN().eval()
    pur = Purifier(image_shape=(1, 28, 28), layer_shapes={"conv3": (64, 7, 7)}, fc_repr=256, f_joint=64,
                   encoder_convs=3, mean=(0.286,), std=(0.353,)).eval()
    return Carso(clf, pur, ["conv3"], samples=samples)


def seconds_per_point(carso: Carso, points: int, repeats: int) -> float:
    x = torch.rand(points, 1, 28, 28)
    y = torch.randint(0, 10, (points,))

    def step():
        xr = x.clone().requires_grad_(True)
        torch.autograd.grad(F.cross_entropy(carso(xr), y, reduction="sum"), xr)

    step()  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - t0) / (repeats * points)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sizes", default="5,10,25,50")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--unpinned", action="store_true", help="leave glibc malloc's thresholds as they start")
    a = ap.parse_args()
    if a.unpinned:
        torch.set_num_threads(a.threads)
    else:
        prepare_worker(a.threads)
    carso = models(a.samples)
    sizes = [int(s) for s in a.sizes.split(",")]
    per = {n: seconds_per_point(carso, n, max(1, a.repeats * sizes[-1] // n)) for n in sizes}
    base = per[sizes[0]]
    print(json.dumps({"threads": a.threads, "samples": a.samples, "malloc_thresholds_pinned": not a.unpinned,
                      "seconds_per_point_gradient": {str(n): round(s, 6) for n, s in per.items()},
                      "speedup_vs_first": {str(n): round(base / s, 3) for n, s in per.items()}}, indent=1))


if __name__ == "__main__":
    main()
