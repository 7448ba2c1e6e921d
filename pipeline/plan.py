"""`pipeline plan`: the stage graph with cache status, the work each stage will do, and the bytes it writes,
from the same arithmetic as storage_layout.md (pipeline/sizing.py). Nothing is run."""
from __future__ import annotations

from .balanced import steps_per_epoch
from .data import info
from .flops import stage_flops
from .log import human_bytes
from .preflight import check
from .runner import status
from .sizing import estimate


def _counts(cfg) -> dict:
    """How many examples each stage processes (shared by the work lines and the FLOPs)."""
    meta, e, ev = info(cfg.data.dataset), estimate(cfg), cfg.eval
    n_train = min(meta.train_size, cfg.data.train_subset or meta.train_size)
    n_test = min(meta.test_size, cfg.data.test_subset or meta.test_size)
    passes = 2 * 2 * ev.aa_steps * ev.aa_eot + ev.pgd_eot_steps * ev.pgd_eot_iters * (1 + ev.pgd_eot_logit_surrogate)
    full, rest = divmod(e["examples"], cfg.attack.shard_size)  # an epoch: one batch stream over the examples
    steps = steps_per_epoch([cfg.attack.shard_size] * full + ([rest] if rest else []), cfg.purifier.batch_size,
                            cfg.purifier.workers)
    return {"n_train": n_train, "n_test": n_test, "examples": e["examples"], "samples": e["samples"],
            "purifier_samples": steps * cfg.purifier.batch_size, "steps": steps,
            "n_eval": min(n_test - ev.first_example, ev.n_examples or n_test), "carso_passes": passes}


def _work(cfg) -> dict[str, str]:
    e, n = estimate(cfg), _counts(cfg)
    c, t, a, p, ev = cfg.classifier, cfg.classifier.train, cfg.attack, cfg.purifier, cfg.eval
    if c.source == "train":
        clf = (f"{t.epochs} epochs x {n['n_train']:,} examples x ({t.pgd_steps} PGD steps + 1) = "
               f"{t.epochs * n['n_train'] * (t.pgd_steps + 1):,} gradient passes; ")
    else:
        clf = f"load {c.source} weights; "
    clf += f"test: {n['n_test']:,} x {t.eval_pgd_steps} PGD steps"
    passes = n["examples"] * (2 + 2 * a.pgd_steps)
    surrogate = " + the same through logit aggregation" if ev.pgd_eot_logit_surrogate else ""
    return {
        "classifier": clf,
        "attacks": f"{n['examples']:,} examples x (2 FGSM + 2 x {a.pgd_steps} PGD steps) = {passes:,} classifier "
                   f"gradient passes -> {e['samples']:,} samples in {e['shards']} shards",
        "activations": f"{e['samples']:,} classifier forward passes, {e['layers']} hooked layers",
        "purifier": f"{p.epochs} epochs x {n['steps']} steps x {p.batch_size} examples (global), {p.workers} "
                    f"worker(s), activations: {p.activations_source}",
        "evaluate": f"{n['n_eval']:,} test points x up to {n['carso_passes']:,} CARSO gradient passes (randAA + eps-0.95 "
                    f"check: 2 x 2 x {ev.aa_steps} steps x EOT {ev.aa_eot}; PGD+EOT {ev.pgd_eot_steps} x EOT "
                    f"{ev.pgd_eot_iters}{surrogate}), {ev.samples} reconstructions each, + standard AA on the "
                    f"classifier",
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


# The paper's Table 1: wall-clock time of the purifier's training on 8 NVIDIA A100 (minutes), per scenario.
PAPER_PURIFIER_MINUTES = {"cifar10": 159}

DEFAULT_TFLOPS = 20.0  # sustained TFLOP/s per device: a rough figure for one A100 on these convnets (TF32)


def _hours(flops: float, tflops: float, devices: int) -> str:
    h = flops / (tflops * 1e12 * devices) / 3600
    return f"{h:.3g} h" if h >= 0.01 else f"{h * 3600:.3g} s"


def plan_lines(ctx, tflops: float = DEFAULT_TFLOPS, devices: int = 1) -> list[str]:
    cfg = ctx.cfg
    check(ctx)
    work, size = _work(cfg), _bytes(cfg)
    flops = stage_flops(cfg, _counts(cfg))
    lines = [f"plan for {cfg.name} ({cfg.data.dataset}), store {ctx.store.root}:",
             "  classifier -> attacks -> activations -> purifier -> evaluate",
             f"  compute: FLOPs counted on the real modules for one example x the work (convolutions and matrix "
             f"products); hours at {tflops:g} TFLOP/s sustained x {devices} device(s) (--tflops, --devices)"]
    for stage, state, where in status(ctx):
        lines += [f"- {stage} [{state}] {where}", f"    work:   {work[stage]}",
                  f"    FLOPs:  {flops[stage]:.3g} -> {_hours(flops[stage], tflops, devices)}",
                  f"    writes: {size[stage]}"]
        if stage == "purifier" and cfg.data.dataset in PAPER_PURIFIER_MINUTES:
            a100 = flops[stage] / (8 * tflops * 1e12) / 60
            lines.append(f"    paper (Table 1): {PAPER_PURIFIER_MINUTES[cfg.data.dataset]} min on 8 A100; this "
                         f"projection on 8 devices at {tflops:g} TFLOP/s: {a100:.0f} min")
    e = estimate(cfg)
    total = e["attack_total_bytes"] + e["activation_total_bytes_raw"]
    all_flops = sum(v for k, v in flops.items() if k != "per_example")
    lines.append(f"total shards + activations (raw): {total:,} B ({human_bytes(total)})")
    lines.append(f"total compute: {all_flops:.3g} FLOPs -> {_hours(all_flops, tflops, devices)} at {tflops:g} "
                 f"TFLOP/s x {devices} (finished stages included)")
    return lines
