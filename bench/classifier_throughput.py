"""The classifier stage's adversarial training inside its Ray task against a plain PyTorch loop, in one run.

Both train the same SmallCNN from the same seed on the same N Fashion-MNIST training images (PGD-7 adversarial
training, the default config's settings) with the same torch thread count; the stage's number is the epoch time
its task records (the training loop alone, as for the plain loop), and its whole-stage time (Ray task start, data
through the object store, the test-set PGD evaluation on ``--test`` points) is reported beside it. The plain loop
runs before and after the stage and its mean is compared. Also says whether both trained byte-identical weights,
and how many CPU seconds every other process on the machine used in each phase (Linux), so that Ray's own daemons
can be told apart from a slower training process, and the page faults of the training process in each phase.
``--malloc`` adds two phases that tell the stage's malloc thresholds (``pipeline.cluster.prepare_worker``) apart
from Ray: the same training call as a bare Ray task that sets the thread count but not the thresholds (what the
stage did before them), and, last, the plain loop again with the thresholds pinned. Prints JSON.

    .venv/bin/python bench/classifier_throughput.py [--n 4000] [--epochs 1] [--test 200] [--malloc]
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from pipeline import runner
from pipeline.adv_train import adversarial_train
from pipeline.cluster import connect, prepare_worker, worker_resources
from pipeline.config import load_config
from pipeline.data import load_split
from pipeline.models import build_classifier, state_dict_hash

REPO = Path(__file__).resolve().parents[1]
WORKER_NICENESS = int(os.environ.get("RAY_worker_niceness", 15))  # Ray's default for its worker processes


def cpu_seconds() -> dict[int, tuple[str, float, int]]:
    """(name, CPU seconds (user + system), minor page faults) so far of every process on the machine, by pid
    (Linux /proc; {} elsewhere)."""
    tick, out = os.sysconf("SC_CLK_TCK"), {}
    for d in Path("/proc").iterdir() if Path("/proc/self/stat").exists() else ():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            name, rest = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
            out[int(d.name)] = (name, (int(rest[11]) + int(rest[12])) / tick, int(rest[7]))
    return out


def faults(before: dict, after: dict, pid: int) -> int:
    return after[pid][2] - before.get(pid, (None, 0.0, 0))[2]


def busiest_others(before: dict, after: dict, exclude: set[int], top: int = 6) -> dict:
    """CPU seconds other processes used between two ``cpu_seconds`` snapshots: the total and the busiest few."""
    used = {pid: (name, s - before.get(pid, (name, 0.0))[1]) for pid, (name, s, _) in after.items() if pid not in exclude}
    ranked = sorted(used.items(), key=lambda kv: -kv[1][1])
    return {"total_s": round(sum(s for _, s in used.values()), 2),
            "busiest": {f"{name}[{pid}]": round(s, 2) for pid, (name, s) in ranked[:top]}}


def plain(cfg, x, y, threads: int) -> tuple[float, str]:
    """The stage's training call, in this process, at the niceness Ray gives its workers (so that other work on
    the machine weighs on both sides alike). Returns (seconds, weights sha256)."""
    before = os.getpriority(os.PRIO_PROCESS, 0)
    os.setpriority(os.PRIO_PROCESS, 0, WORKER_NICENESS)
    try:
        return _plain(cfg, x, y, threads)
    finally:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, before)  # lowering it back needs root; harmless otherwise
        except PermissionError:
            pass


def _plain(cfg, x, y, threads: int) -> tuple[float, str]:
    torch.set_num_threads(threads)
    t = cfg.classifier.train
    torch.manual_seed(t.seed)
    model = build_classifier(cfg.classifier.arch, cfg.data.dataset, cfg.classifier.activation)
    t0 = time.perf_counter()
    adversarial_train(model, x, y, epochs=t.epochs, batch_size=t.batch_size, lr=t.lr, momentum=t.momentum,
                      weight_decay=t.weight_decay, eps=t.eps, pgd_steps=t.pgd_steps, pgd_step_size=t.pgd_step_size,
                      seed=t.seed, log=lambda line: None)
    return time.perf_counter() - t0, state_dict_hash(model.eval())


def _unpinned_task(cfg, x, y, threads: int) -> tuple[float, str, int]:
    """A bare Ray task: threads set, malloc thresholds left as glibc starts them. Returns (seconds, sha, faults)."""
    torch.set_num_threads(threads)
    f0 = cpu_seconds()[os.getpid()][2]
    seconds, sha = _plain(cfg, x, y, threads)
    return seconds, sha, cpu_seconds()[os.getpid()][2] - f0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--test", type=int, default=200)
    ap.add_argument("--malloc", action="store_true",
                    help="also time a bare Ray task without the malloc thresholds, and the plain loop with them")
    a = ap.parse_args()
    cfg = load_config(REPO / "configs/fmnist.yaml", [f"data.train_subset={a.n}", f"data.test_subset={a.test}",
                                                     f"classifier.train.epochs={a.epochs}"])
    tmp = Path(tempfile.mkdtemp(prefix="bench-classifier-"))
    ctx = runner.Context(cfg=cfg, store=runner.store_root(tmp / "store"), log=lambda m: None)
    t0 = time.perf_counter()
    connect(None, log=lambda m: None)
    ray_init_s = time.perf_counter() - t0
    ctx.ray_ready = True
    threads = int(worker_resources(1)["num_cpus"])  # what the stage's task gets

    x, y = load_split(cfg.data.dataset, "train", cfg.data.data_dir, cfg.data.train_subset)
    me = {os.getpid()}
    c0 = cpu_seconds()
    before_s, plain_sha = plain(cfg, x, y, threads)  # plain, Ray, plain: a machine busy with other work
    c1 = cpu_seconds()                                # weighs on both sides alike
    t0 = time.perf_counter()
    out = runner.run(ctx, "classifier")[0]
    stage_s = time.perf_counter() - t0
    c2 = cpu_seconds()
    unpinned = None
    if a.malloc:
        import ray

        task = ray.remote(num_cpus=threads, max_calls=1)(_unpinned_task)
        unpinned = ray.get(task.remote(cfg, x, y, threads))
    c2b = cpu_seconds()
    after_s, _ = plain(cfg, x, y, threads)
    c3 = cpu_seconds()
    pid = os.getpid()
    pinned = None
    if a.malloc:  # last: the thresholds stay pinned in this process once set
        prepare_worker(threads)
        pinned = plain(cfg, x, y, threads)
    used = {pid: s - c1.get(pid, (n, 0.0, 0))[1] for pid, (n, s, _) in c2.items()}
    worker = max(used, key=used.get)  # the Ray worker that trained: by far the busiest process of the stage
    plain_s = (before_s + after_s) / 2
    metrics = json.loads((out.dir / "metrics.json").read_text())
    train_s = sum(h["seconds"] for h in metrics["history"])
    print(json.dumps({
        "bench": "classifier_throughput", "examples": a.n, "epochs": a.epochs, "torch_threads": threads,
        "plain_train_s": round(plain_s, 2), "plain_runs_s": [round(before_s, 2), round(after_s, 2)], "plain_examples_per_s": round(a.n * a.epochs / plain_s, 1),
        "ray_task_train_s": round(train_s, 2), "ray_examples_per_s": round(a.n * a.epochs / train_s, 1),
        "ray_over_plain_ratio": round(train_s / plain_s, 3),
        "niceness_both_sides": WORKER_NICENESS, "ray_stage_total_s": round(stage_s, 2), "ray_init_s_excluded": round(ray_init_s, 2),
        "identical_weights": out.manifest()["weights_sha256"] == plain_sha,
        # Minor page faults of the training process (the plain phases: this whole process, data loading excluded)
        "page_faults": {"plain_before": faults(c0, c1, pid), "ray_task_worker": faults(c1, c2, worker),
                        "plain_after": faults(c2b, c3, pid)},
        **({"unpinned_ray_task": {"train_s": round(unpinned[0], 2), "over_plain_ratio": round(unpinned[0] / plain_s, 3),
                                  "page_faults": unpinned[2], "identical_weights": unpinned[1] == plain_sha}}
           if unpinned else {}),
        **({"plain_pinned": {"train_s": round(pinned[0], 2), "over_plain_ratio": round(pinned[0] / plain_s, 3),
                             "identical_weights": pinned[1] == plain_sha}} if pinned else {}),
        # What else ran on the machine meanwhile (the driver excluded: during the stage it only waits and polls)
        "other_processes_cpu_s": {"plain_before": busiest_others(c0, c1, me), "plain_after": busiest_others(c2b, c3, me),
                                  "ray_stage": busiest_others(c1, c2, me | {worker}),
                                  "ray_task_worker": {c2[worker][0]: round(used[worker], 2)}},
    }, indent=2))


if __name__ == "__main__":
    main()
