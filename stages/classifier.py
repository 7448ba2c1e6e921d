"""Stage `classifier`: obtain the frozen classifier (train it adversarially, load a file, or RobustBench),
measure its clean and PGD test accuracy, and store ``model.pt`` + ``metrics.json``.

The training runs as one Ray task (one GPU when the cluster has one); the data travels through Ray's object
store, so the task may land on any node.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from pipeline.adv_train import accuracy_under_pgd, adversarial_train
from pipeline.cluster import device_for, prepare_worker, worker_resources
from pipeline.config import RunConfig
from pipeline.context import Context, data_identity
from pipeline.data import load_split
from pipeline.log import Follow
from pipeline.models import (
    ModelError,
    build_classifier,
    load_robustbench,
    load_state_dict_file,
    load_weights,
    save_state_dict,
    state_dict_hash,
)
from pipeline.store import Output, array_sha256, atomic_write_json, file_record, sha256_file

# Code version of this stage, part of its store key (pipeline.context.Context.key): bump it whenever a change
# alters what the stage writes.
VERSION = 1
UPSTREAM: tuple[str, ...] = ()


_TRAIN = ("epochs", "batch_size", "lr", "momentum", "weight_decay", "pgd_steps", "pgd_step_size")
_TEST = ("eps", "eval_pgd_steps", "eval_pgd_step_size", "eval_batch_size", "seed")
# The spec (pipeline/spec.py): the test evaluation always (its PGD runs at ``classifier.train.eps`` from random
# starts seeded by ``classifier.train.seed``, whatever the source); the training settings only when it trains,
# the RobustBench name only when it loads one (a `file` checkpoint enters by its sha256: inputs).
READS = ("data.dataset", "data.test_subset", "classifier.arch", "classifier.activation", "classifier.source",
         *(f"classifier.train.{f}" for f in _TEST), "data.train_subset", *(f"classifier.train.{f}" for f in _TRAIN),
         "classifier.robustbench_name")


def reads(cfg) -> tuple[str, ...]:
    c = cfg.classifier
    return tuple(p for p in READS if not (
        (c.source != "train" and (p == "data.train_subset" or p.split(".")[-1] in _TRAIN))
        or (c.source != "robustbench" and p == "classifier.robustbench_name")))


def inputs(ctx: Context) -> dict:
    c = ctx.cfg.classifier
    if c.source != "file":
        return {}
    try:
        return {"file_sha256": sha256_file(Path(c.path))}
    except FileNotFoundError:
        raise ModelError(f"{c.path}: checkpoint not found (classifier.path)") from None


def _obtain(cfg: RunConfig, train_ref, test_ref, out_dir: str, device: str, threads: int, progress: str) -> dict:
    """Runs inside a Ray task: train or load, evaluate, save. Returns the metrics. Progress lines go to the file
    ``progress``, which the driver prints from (the task's own output stays in Ray's logs)."""
    prepare_worker(threads)
    c, t = cfg.classifier, cfg.classifier.train
    torch.manual_seed(t.seed)  # weight initialisation
    model = build_classifier(c.arch, cfg.data.dataset, c.activation)
    history = []
    if c.source == "train":
        x, y = train_ref
        history = adversarial_train(model, x, y, epochs=t.epochs, batch_size=t.batch_size, lr=t.lr,
                                    momentum=t.momentum, weight_decay=t.weight_decay, eps=t.eps,
                                    pgd_steps=t.pgd_steps, pgd_step_size=t.pgd_step_size, seed=t.seed, device=device,
                                    log=lambda line: _append(progress, line))
    elif c.source == "file":
        load_weights(model, load_state_dict_file(c.path), c.path)
    else:
        rb = load_robustbench(c.robustbench_name, cfg.data.dataset)
        load_weights(model, {k.removeprefix("module."): v for k, v in rb.state_dict().items()}, c.robustbench_name)
    model.eval()
    xt, yt = test_ref
    metrics = accuracy_under_pgd(model, xt, yt, eps=t.eps, steps=t.eval_pgd_steps, step_size=t.eval_pgd_step_size,
                                 batch_size=t.eval_batch_size, seed=t.seed, device=device,
                                 log=lambda line: _append(progress, line))
    save_state_dict(model.cpu(), Path(out_dir) / "model.pt")
    return {**metrics, "history": history}


def _append(path: str, line: str) -> None:
    with open(path, "a") as f:
        f.write(line + "\n")


def run(ctx: Context, out: Output) -> None:
    import ray

    cfg = ctx.cfg
    t0 = time.perf_counter()
    train = load_split(cfg.data.dataset, "train", cfg.data.data_dir, cfg.data.train_subset) \
        if cfg.classifier.source == "train" else None
    test = load_split(cfg.data.dataset, "test", cfg.data.data_dir, cfg.data.test_subset)
    ctx.ray()
    res = worker_resources(1)
    ctx.log(f"[classifier] {cfg.classifier.source} {cfg.classifier.arch} on {device_for(res)} "
            f"({res['num_cpus']} CPU, {res['num_gpus']} GPU)")
    task = ray.remote(_obtain).options(**res, max_retries=1)
    progress = out.dir / f".progress.tmp-{os.getpid()}"  # a temporary: not part of the output
    try:
        with Follow(progress, ctx.log):
            metrics = ray.get(task.remote(cfg, train, test, str(out.dir), device_for(res),
                                          int(res["num_cpus"]), str(progress.resolve())))
    finally:
        progress.unlink(missing_ok=True)

    model = build_classifier(cfg.classifier.arch, cfg.data.dataset, cfg.classifier.activation)
    load_weights(model, load_state_dict_file(out.dir / "model.pt"), str(out.dir / "model.pt"))
    weights = state_dict_hash(model)
    metrics.update({"arch": cfg.classifier.arch, "source": cfg.classifier.source, "weights_sha256": weights,
                    "test_data_sha256": array_sha256(*test)})
    atomic_write_json(out.dir / "metrics.json", metrics)
    ctx.log(f"[classifier] test accuracy: clean {metrics['clean_acc']:.4f}, PGD {metrics['pgd_acc']:.4f} "
            f"(Linf eps={metrics['attack']['eps']:g}, {metrics['attack']['steps']} steps of "
            f"{metrics['attack']['step_size']:g}, random start, n={metrics['n']})")
    files = [file_record(out.dir, out.dir / n) for n in ("model.pt", "metrics.json")]
    out.finalize(inputs={"test": data_identity(cfg, "test"),
                         **({"train": data_identity(cfg, "train"), "train_data_sha256": array_sha256(*train)}
                            if train else {})},
                 files=files, counts={"test_examples": metrics["n"]},
                 timings={"total_s": time.perf_counter() - t0},
                 extra={"weights_sha256": weights, "arch": cfg.classifier.arch,
                        "activation": cfg.classifier.activation})
