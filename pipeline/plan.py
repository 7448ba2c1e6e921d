"""`pipeline plan`: the stage graph with cache status, the work each stage will do, and the bytes it writes,
from the same arithmetic as storage_layout.md (pipeline/sizing.py). Nothing is run."""
from __future__ import annotations

from .data import info
from .log import human_bytes
from .sizing import estimate


def _work(cfg) -> dict[str, str]:
    meta, e = info(cfg.data.dataset), estimate(cfg)
    c, t, a, p, ev = cfg.classifier, cfg.classifier.train, cfg.attack, cfg.purifier, cfg.eval
    n_train = min(meta.train_size, cfg.data.train_subset or meta.train_size)
    n_test = min(meta.test_size, cfg.data.test_subset or meta.test_size)
    if c.source == "train":
        clf = (f"{t.epochs} epochs x {n_train:,} examples x ({t.pgd_steps} PGD steps + 1) = "
               f"{t.epochs * n_train * (t.pgd_steps + 1):,} gradient passes; ")
    else:
        clf = f"load {c.source} weights; "
    clf += f"test: {n_test:,} x {t.eval_pgd_steps} PGD steps"
    n = e["examples"]
    passes = n * (2 + 2 * a.pgd_steps)
    steps = e["examples"] // p.batch_size
    n_eval = min(n_test, ev.n_examples or n_test)
    per_point = 2 * 2 * ev.aa_steps * ev.aa_eot + ev.pgd_eot_steps * ev.pgd_eot_iters
    return {
        "classifier": clf,
        "attacks": f"{n:,} examples x (2 FGSM + 2 x {a.pgd_steps} PGD steps) = {passes:,} classifier gradient passes "
                   f"-> {e['samples']:,} samples in {e['shards']} shards",
        "activations": f"{e['samples']:,} classifier forward passes, {e['layers']} hooked layers",
        "purifier": f"{p.epochs} epochs x ~{steps} steps x {p.batch_size} examples (global), {p.workers} worker(s), "
                    f"activations: {p.activations_source}",
        "evaluate": f"{n_eval:,} test points x up to {per_point:,} CARSO gradient passes (randAA + eps-0.95 check: "
                    f"2 x 2 x {ev.aa_steps} steps x EOT {ev.aa_eot}; PGD+EOT {ev.pgd_eot_steps} x EOT "
                    f"{ev.pgd_eot_iters}), {ev.samples} reconstructions each, + standard AA on the classifier",
    }


def _bytes(cfg) -> dict[str, str]:
    e = estimate(cfg)
    return {"classifier": "model.pt + metrics (small)",
            "attacks": f"{e['attack_total_bytes']:,} B ({human_bytes(e['attack_total_bytes'])}; "
                       f"{e['attack_bytes_per_example']:,} B/example)",
            "activations": f"{e['activation_total_bytes_raw']:,} B raw ({human_bytes(e['activation_total_bytes_raw'])}; "
                           f"{e['activation_bytes_per_example']:,} B/example) before compression",
            "purifier": "checkpoints (model + optimizer state, ~4x parameters x 4 B, two kept)",
            "evaluate": "results.json, report.md, reconstructions.png, per-chunk outcomes (small)"}


def plan_lines(ctx) -> list[str]:
    from .runner import status

    cfg = ctx.cfg
    work, size = _work(cfg), _bytes(cfg)
    lines = [f"plan for {cfg.name} ({cfg.data.dataset}), store {ctx.store.root}:",
             "  classifier -> attacks -> activations -> purifier -> evaluate"]
    for stage, state, where in status(ctx):
        lines += [f"- {stage} [{state}] {where}", f"    work:   {work[stage]}", f"    writes: {size[stage]}"]
    e = estimate(cfg)
    total = e["attack_total_bytes"] + e["activation_total_bytes_raw"]
    lines.append(f"total shards + activations (raw): {total:,} B ({human_bytes(total)})")
    return lines
