"""Stage `attacks`: the purifier's training inputs (section 4.4, Table 12) as WebDataset shards.

For every training example: the clean image, FGSM at eps/2 and eps, PGD at eps/2 and eps (``attack.pgd_steps``
steps of ``attack.pgd_step_size``, uniform random start seeded per example, cross-entropy, untargeted),
against the frozen classifier. Shard k holds source examples [k*S, (k+1)*S) with S = ``attack.shard_size``,
five samples each, in a fixed order, computed in fixed batches: the bytes do not depend on the number of
workers. Units are shards; a killed run redoes only shards without a receipt.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from pipeline.attacks import KINDS, training_mix
from pipeline.cluster import prepare_worker
from pipeline.config import AttackConfig
from pipeline.context import Context, classifier_identity, data_identity
from pipeline.data import info, load_split, to_float
from pipeline.models import classifier_payload
from pipeline.precision import wrap
from pipeline.shards import write_shard
from pipeline.store import Output, array_sha256

from . import _pool


def effective_eps(cfg) -> float:
    """attack.eps in pixel space, or divided by the dataset's mean per-channel std (the authors' code)."""
    if cfg.attack.eps_scaling == "pixel":
        return cfg.attack.eps
    std = info(cfg.data.dataset).std
    return cfg.attack.eps / (sum(std) / len(std))


def n_examples(cfg, n_train: int | None = None) -> int:
    """How many training examples are attacked (attack.n_examples of the data.train_subset)."""
    avail = n_train if n_train is not None else (cfg.data.train_subset or _split_size(cfg))
    return min(avail, cfg.attack.n_examples) if cfg.attack.n_examples else avail


def _split_size(cfg) -> int:
    return len(load_split(cfg.data.dataset, "train", cfg.data.data_dir, cfg.data.train_subset)[1])


# Code version of this stage, part of its store key (pipeline.context.Context.key): bump it whenever a change
# alters what the stage writes.
VERSION = 1
UPSTREAM = ("classifier",)


# The spec (pipeline/spec.py): the training data, every attack setting, and the classifier (inputs).
READS = ("data.dataset", "data.train_subset", "attack.eps", "attack.eps_scaling", "attack.pgd_steps",
         "attack.pgd_step_size", "attack.pgd_random_start", "attack.n_examples", "attack.batch_size",
         "attack.shard_size", "attack.seed", "attack.precision")


def inputs(ctx: Context) -> dict:
    return {"classifier": classifier_identity(ctx)}


def shard_name(k: int) -> str:
    return f"shard-{k:06d}"


class AttackWorker(_pool.UnitWorker):
    """Ray Data actor: holds the classifier and the training images; turns one unit into one shard."""

    def __init__(self, model_box, data_box, out_dir: str, attack: AttackConfig, eps: float, device: str, threads: int):
        prepare_worker(threads)
        self.device = device
        self.model = _pool.unbox(model_box).build(device)
        self.x, self.y = _pool.unbox(data_box)
        self.out = Output(Path(out_dir), "attacks", "")
        self.p, self.eps = attack, eps  # eps: attack.eps in pixel space (effective_eps)

    def do_unit(self, u: dict) -> dict:
        unit, start, stop = str(u["unit"]), int(u["start"]), int(u["stop"])
        t0 = time.perf_counter()
        mixes = [self.attack_batch(i, min(i + self.p.batch_size, stop)) for i in range(start, stop, self.p.batch_size)]
        path = self.out.dir / f"{unit}.tar"
        n = write_shard(path, (s for mix in mixes for s in mix))
        return self.out.write_receipt(unit, [path], samples=n, examples=[start, stop],
                                      seconds=time.perf_counter() - t0)

    def attack_batch(self, i: int, j: int) -> list[tuple]:
        x = to_float(self.x[i:j]).to(self.device)
        y = self.y[i:j].to(self.device)
        idx = torch.arange(i, j)
        mix = training_mix(wrap(self.model, self.p.precision, self.device), x, y, idx, eps=self.eps,
                           pgd_steps=self.p.pgd_steps, pgd_step_size=self.p.pgd_step_size,
                           random_start=self.p.pgd_random_start, seed=self.p.seed)
        imgs = {k: v.cpu().numpy() for k, v in mix.items()}
        return [(int(idx[r]), int(y[r]), kind, imgs[kind][r]) for r in range(j - i) for kind in KINDS]


def run(ctx: Context, out: Output) -> None:
    cfg = ctx.cfg
    t0 = time.perf_counter()
    x, y = load_split(cfg.data.dataset, "train", cfg.data.data_dir, cfg.data.train_subset)
    n = n_examples(cfg, len(y))
    x, y = x[:n], y[:n]
    S = cfg.attack.shard_size
    all_units = [{"unit": shard_name(k), "start": s, "stop": min(s + S, n), "items": min(s + S, n) - s}
                 for k, s in enumerate(range(0, n, S))]
    done = out.done_units()
    todo = [u for u in all_units if u["unit"] not in done]
    eps = effective_eps(cfg)
    ctx.log(f"[attacks] {n} examples x 5 (clean, FGSM eps/2, FGSM eps, PGD eps/2, PGD eps) at eps={eps:.6g}, "
            f"PGD {cfg.attack.pgd_steps} steps of {cfg.attack.pgd_step_size:g}")
    ctx.ray()
    summary = _pool.run_units(
        ctx, out, stage="attacks", worker_cls=AttackWorker, units=todo, total_items=n,
        done_items=sum(u["stop"] - u["start"] for u in all_units if u["unit"] in done),
        worker_kwargs={"model_box": _pool.ref_box(classifier_payload(ctx.upstream("classifier"), cfg.data.dataset)),
                       "data_box": _pool.ref_box((x, y)), "out_dir": str(out.dir), "attack": cfg.attack,
                       "eps": eps})
    receipts = {r["unit"]: r for r in out.receipts()}
    missing = [u["unit"] for u in all_units if u["unit"] not in receipts]
    if missing:
        raise RuntimeError(f"[attacks] units {missing[:3]} produced no receipt")
    files = [f for u in all_units for f in receipts[u["unit"]]["files"]]
    out.finalize(inputs={"train": data_identity(cfg, "train"), "train_data_sha256": array_sha256(x, y),
                         "classifier": classifier_identity(ctx)},
                 files=files,
                 counts={"examples": n, "samples": len(KINDS) * n, "shards": len(all_units), "shard_size": S},
                 timings={"total_s": time.perf_counter() - t0, "this_run": summary},
                 extra={"eps": eps, "kinds": list(KINDS),
                        "units": [{"unit": u["unit"], "start": u["start"], "stop": u["stop"]} for u in all_units]})
