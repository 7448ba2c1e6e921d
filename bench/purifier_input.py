"""Purifier input pipeline throughput against the training step's own consumption rate, in one run.

Measures, for one data-parallel worker of the given config (its shards, its per-worker batch):
  - loader, cold: examples/s that BalancedBatches delivers from the store (shard verification, WebDataset
    decoding, Zarr chunk decompression, shuffle buffer, gathering), nothing else running;
  - loader, warm: the same with the worker's shards already in memory (later epochs, when they fit);
  - trainer: examples/s of forward + backward + RAdam/Lookahead step on batches already in memory.
ratio = loader / trainer; above 1 the loader outpaces the trainer. In the stage the next shard loads in a
background thread while the current one is consumed, and each epoch logs the time the trainer waited on
data (metrics.jsonl: data_wait_s). Prints JSON.

    .venv/bin/python bench/purifier_input.py [--config configs/fmnist.yaml] [--store runs] [--workers 2]

Needs the config's activations in the store (pipeline run --config ... --stage activations).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/fmnist.yaml")
    ap.add_argument("--store", default="runs")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the worker (2 cores / 2 workers)")
    args = ap.parse_args()

    import torch

    from pipeline import runner
    from pipeline.balanced import BalancedBatches, ShardLoader, steps_per_epoch
    from pipeline.config import load_config
    from pipeline.context import conditioning_layers
    from pipeline.purifier_train import build_optimizer, conditioning, train_step
    from stages.purifier import model_spec

    torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    ctx = runner.Context(cfg=cfg, store=runner.store_root(Path(args.store)), log=lambda m: None)
    p, layers = cfg.purifier, conditioning_layers(ctx)
    attacks, acts = ctx.upstream("attacks"), ctx.upstream("activations")
    examples = [u["stop"] - u["start"] for u in attacks.manifest()["units"]]
    steps = min(args.steps, steps_per_epoch(examples, p.batch_size, args.workers))
    where = {"attacks_dir": str(attacks.dir), "activations_dir": str(acts.dir), "layers": layers}

    def batches():
        return BalancedBatches(ShardLoader(**where, cache_bytes=0), len(examples), batch_size=p.batch_size, adv_fraction=p.adv_fraction,
                               workers=args.workers, rank=0, steps=steps, buffer_examples=2 * cfg.attack.shard_size,
                               seed=0).epoch(0)

    t0 = time.perf_counter()
    held = list(batches())
    loader_s = time.perf_counter() - t0
    n = sum(len(b.targets) for b in held)
    # Warm: shards already in memory (the stage keeps them across epochs when they fit its budget).
    loader = ShardLoader(**where, cache_bytes=8 * 1024 ** 3)
    for k in range(0, len(examples), args.workers):  # rank 0's shards
        loader(k)
    t0 = time.perf_counter()
    warm = list(BalancedBatches(loader, len(examples), batch_size=p.batch_size, adv_fraction=p.adv_fraction,
                                workers=args.workers, rank=0, steps=steps, buffer_examples=2 * cfg.attack.shard_size,
                                seed=0).epoch(0))
    warm_s = time.perf_counter() - t0

    model = model_spec(ctx, layers).build().train()
    opt = build_optimizer(model, p)
    for g in opt.param_groups:
        g["lr"] = p.plateau_lr
    t0 = time.perf_counter()
    for b in held:
        train_step(model, opt, torch.from_numpy(b.inputs), torch.from_numpy(b.targets),
                   conditioning(b, None, layers, cfg.activations.dtype, "cpu"), 1.0)
    train_s = time.perf_counter() - t0
    print(json.dumps({"bench": "purifier_input", "config": args.config, "workers": args.workers,
                      "torch_threads": args.threads, "per_worker_batch": p.batch_size // args.workers, "steps": steps,
                      "examples": n, "loader_cold_examples_per_s": round(n / loader_s, 1),
                      "loader_warm_examples_per_s": round(sum(len(b.targets) for b in warm) / warm_s, 1),
                      "train_examples_per_s": round(n / train_s, 1),
                      "cold_loader_over_train_ratio": round(train_s / loader_s, 2),
                      "warm_loader_over_train_ratio": round(train_s / warm_s, 2)}, indent=2))


if __name__ == "__main__":
    main()
