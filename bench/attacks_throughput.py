"""Attacks stage through Ray (one actor) against a plain single-process PyTorch loop, in one run.

Both do the same work on the same model, data and batch size: clean + FGSM eps/2 + FGSM eps + PGD eps/2 +
PGD eps (40 steps) for N Fashion-MNIST training images, written as WebDataset shards. Prints JSON.

    .venv/bin/python bench/attacks_throughput.py [--n 2000] [--batch-size 500] [--pgd-steps 40]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def plain_loop(model, x, y, *, eps, steps, step_size, batch_size, shard_size, out_dir: Path) -> float:
    from pipeline.attacks import KINDS, training_mix
    from pipeline.data import to_float
    from pipeline.shards import write_shard

    t0 = time.perf_counter()
    for k, s in enumerate(range(0, len(y), shard_size)):
        samples = []
        for i in range(s, min(s + shard_size, len(y)), batch_size):
            j = min(i + batch_size, s + shard_size, len(y))
            mix = training_mix(model, to_float(x[i:j]), y[i:j], torch.arange(i, j), eps=eps, pgd_steps=steps,
                               pgd_step_size=step_size, random_start=True, seed=0)
            samples += [(i + r, int(y[i + r]), kind, mix[kind][r].numpy()) for r in range(j - i) for kind in KINDS]
        write_shard(out_dir / f"shard-{k:06d}.tar", samples)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=500)
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--pgd-steps", type=int, default=40)
    args = ap.parse_args()

    from pipeline import runner
    from pipeline.cluster import connect
    from pipeline.config import load_config
    from pipeline.data import load_split
    from pipeline.models import build_classifier, save_state_dict

    repo = Path(__file__).resolve().parents[1]
    tmp = Path(tempfile.mkdtemp(prefix="bench-attacks-"))
    torch.manual_seed(0)
    model = build_classifier("cnn", "fmnist").eval()
    save_state_dict(model, tmp / "cnn.pt")
    threads = torch.get_num_threads()

    cfg = load_config(repo / "configs/fmnist.yaml", [
        "classifier.source=file", f"classifier.path={tmp / 'cnn.pt'}", "data.test_subset=100",
        f"attack.n_examples={args.n}", f"attack.batch_size={args.batch_size}", f"attack.shard_size={args.shard_size}",
        f"attack.pgd_steps={args.pgd_steps}", f"activations.chunk_rows={args.shard_size}"])
    x, y = load_split("fmnist", "train")
    x, y = x[:args.n], y[:args.n]

    (tmp / "plain").mkdir()
    plain_s = plain_loop(model, x, y, eps=cfg.attack.eps, steps=cfg.attack.pgd_steps,
                         step_size=cfg.attack.pgd_step_size, batch_size=args.batch_size,
                         shard_size=args.shard_size, out_dir=tmp / "plain")

    ctx = runner.Context(cfg=cfg, store=runner.store_root(tmp / "store"), workers=1, log=lambda m: None)
    t0 = time.perf_counter()
    connect(None, log=lambda m: None)
    ray_init_s = time.perf_counter() - t0
    ctx.ray_ready = True
    runner.run(ctx, "classifier")
    out = ctx.output("attacks", create=True)
    t0 = time.perf_counter()
    runner.run_stage(ctx, "attacks")
    ray_s = time.perf_counter() - t0
    unit_s = sum(r["seconds"] for r in out.receipts())
    same = all((tmp / "plain" / p.name).read_bytes() == p.read_bytes() for p in sorted(out.dir.glob("shard-*.tar")))
    print(json.dumps({
        "bench": "attacks_throughput", "examples": args.n, "batch_size": args.batch_size,
        "pgd_steps": args.pgd_steps, "torch_threads": threads, "ray_workers": 1,
        "plain_loop_s": round(plain_s, 2), "plain_examples_per_s": round(args.n / plain_s, 2),
        "ray_stage_s": round(ray_s, 2), "ray_examples_per_s": round(args.n / ray_s, 2),
        "ray_units_compute_s": round(unit_s, 2), "ray_init_s_excluded": round(ray_init_s, 2),
        "ray_overhead_ratio": round(ray_s / plain_s, 3), "identical_shards": same,
    }, indent=2))


if __name__ == "__main__":
    main()
