"""`pipeline plan`: the stage graph with cache status, the work each stage will do, and the bytes it writes,
from the same arithmetic as storage_layout.md (pipeline/sizing.py), beside the free space under the store.
Nothing is run. Also what a stopped run had finished (``stopped``, ``full_disk_line``), from the same store
state, for the CLI's last line after SIGTERM, Ctrl-C or a full disk."""
from __future__ import annotations

import json

from . import runner
from .balanced import steps_per_epoch
from .calibrate import DEFAULT_SECONDS, check_seconds, project
from .data import info
from .errors import OptionError, free_bytes, one_line
from .flops import stage_flops
from .log import human_bytes
from .preflight import check, describe, pending_bytes, training_images
from .runner import status
from .evaluation import Attacked, carso_passes
from .sizing import ACTIVATIONS_COMPRESSION, estimate


def _counts(cfg, attacked: Attacked | None = None) -> dict:
    """How many examples each stage processes (shared by the work lines and the FLOPs); the evaluation's gradient
    passes expected for the ``attacked`` fractions (None: at most)."""
    meta, e, ev = info(cfg.data.dataset), estimate(cfg), cfg.eval
    n_train = min(meta.train_size, cfg.data.train_subset or meta.train_size)
    n_test = min(meta.test_size, cfg.data.test_subset or meta.test_size)
    passes = carso_passes(ev, attacked)
    full, rest = divmod(e["examples"], cfg.attack.shard_size)  # an epoch: one batch stream over the examples
    steps = steps_per_epoch([cfg.attack.shard_size] * full + ([rest] if rest else []), cfg.purifier.batch_size,
                            cfg.purifier.workers)
    return {"n_train": n_train, "n_test": n_test, "examples": e["examples"], "samples": e["samples"],
            "purifier_samples": steps * cfg.purifier.batch_size, "steps": steps,
            "n_eval": min(n_test - ev.first_example, ev.n_examples or n_test), "carso_passes": passes,
            "carso_passes_max": carso_passes(ev), "attacked": attacked}


def work_counts(cfg, attacked: Attacked | None = None) -> dict:
    """The counts behind every stage's FLOPs (``pipeline.flops.stage_flops``) and calibrated seconds
    (``pipeline.calibrate.project``); the evaluation's attacks on the ``attacked`` fractions (None: every point)."""
    return {**_counts(cfg, attacked), "probe_layers": len(probe_layers(cfg))}


def expected_attacked(ctx) -> Attacked | None:
    """The fractions of points the evaluation's AutoAttack runs are expected to attack, from the classifier's
    test accuracies (its stage's metrics.json: clean, and PGD at the threat model's eps), when its stage is done;
    None before (the plan then counts every attack on every point: an upper bound). The obfuscation check's
    APGD-DLR is budgeted at chance accuracy, the most a passing check leaves."""
    out = ctx.output_or_none("classifier", complete=True)
    metrics = out.dir / "metrics.json" if out else None
    if metrics is None or not metrics.is_file():
        return None
    m = json.loads(metrics.read_text())
    if not isinstance(m.get("clean_acc"), (int, float)) or not isinstance(m.get("pgd_acc"), (int, float)):
        return None
    return Attacked(clean=float(m["clean_acc"]), robust=float(m["pgd_acc"]),
                    chance=1.0 / info(ctx.cfg.data.dataset).num_classes)


def _work(cfg, attacked: Attacked | None = None) -> dict[str, str]:
    e, n = estimate(cfg), _counts(cfg, attacked)
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
        "probes": _probe_work(cfg),
        "evaluate": f"{n['n_eval']:,} test points x up to {n['carso_passes_max']:,} CARSO gradient passes (randAA + "
                    f"eps-0.95 check: 2 x 2 x {ev.aa_steps} steps x EOT {ev.aa_eot}; PGD+EOT {ev.pgd_eot_steps} x EOT "
                    f"{ev.pgd_eot_iters}{surrogate}), {ev.samples} reconstructions each, + standard AA on the "
                    f"classifier" + _expected(n),
    }


def _expected(n: dict) -> str:
    a = n["attacked"]
    if a is None:
        return "; FLOPs for every attack on every point (an upper bound until the classifier is trained)"
    return (f"; FLOPs for {n['carso_passes']:,.0f} passes per point expected: AutoAttack's runner attacks only the "
            f"points still right, taken as the classifier's clean {100 * a.clean:.1f}% (APGD-CE), PGD "
            f"{100 * a.robust:.1f}% (APGD-DLR, standard AA's APGD-T, FAB-T, Square) and chance {100 * a.chance:.0f}% "
            f"(the eps-0.95 check's APGD-DLR)")


def probe_layers(cfg) -> list[str]:
    """The layers the probes stage would probe (before the classifier exists: from the configured architecture)."""
    from .preflight import hookable_layers

    return cfg.probes.layers or cfg.activations.layers or hookable_layers(cfg)[1]


def _probe_work(cfg) -> str:
    pr, k = cfg.probes, len(probe_layers(cfg))
    kinds = " + ".join(n for n, on in (("transfer", pr.transfer), ("robust", pr.robust)) if on)
    work = (f"{k} layers x {kinds} probe(s); scored on {pr.n_examples:,} test points x PGD {pr.pgd_steps} (classifier "
            f"once + adaptive per probe)")
    if pr.robust:
        work += f"; robust training {pr.robust_epochs} epochs x {pr.robust_examples:,} images x {pr.robust_pgd_steps} PGD"
    return work + " (run on request: --stage probes)"


def _bytes(cfg) -> dict[str, str]:
    e = estimate(cfg)
    return {"classifier": "model.pt + metrics (small)",
            "attacks": f"{e['attack_total_bytes']:,} B ({human_bytes(e['attack_total_bytes'])}; "
                       f"{e['attack_bytes_per_example']:,} B/example)",
            "activations": f"{e['activation_total_bytes_raw']:,} B raw ({human_bytes(e['activation_total_bytes_raw'])}; "
                           f"{e['activation_bytes_per_example']:,} B/example) before compression; on disk about "
                           f"{human_bytes(e['activation_total_bytes_compressed'])} (compression ratio "
                           f"{ACTIVATIONS_COMPRESSION}, measured on the default job: an estimate)",
            "purifier": "checkpoints (weights, Lookahead's slow weights, optimizer state: ~5x parameters x 4 B each; "
                        "two kept, three for a moment) + purifier.pt",
            "evaluate": "results.json, report.md, reconstructions.png, per-chunk outcomes (small)",
            "probes": "probes.json, report.md, probes.png, the probes' weights (small)"}


# The paper's Table 1: wall-clock time of the purifier's training on 8 NVIDIA A100 (minutes), per scenario.
PAPER_PURIFIER_MINUTES = {"cifar10": 159}

DEFAULT_TFLOPS = 20.0  # sustained TFLOP/s per device: a rough figure for one A100 on these convnets (TF32)


def _hours(flops: float, tflops: float, devices: int) -> str:
    return _duration(flops / (tflops * 1e12 * devices))


def _duration(seconds: float) -> str:
    h = seconds / 3600
    return f"{h:.3g} h" if h >= 0.01 else f"{seconds:.3g} s"


def check_options(tflops: float | None, devices: int | None, calibrate: bool, calibrate_seconds: float | None) -> None:
    """``--calibrate`` measures the rates, so it takes no ``--tflops`` or ``--devices``; ``--calibrate-seconds``
    only with it, above 0."""
    if calibrate and (tflops is not None or devices is not None):
        given = " and ".join(o for o, v in (("--tflops", tflops), ("--devices", devices)) if v is not None)
        raise OptionError(f"{given}: not with --calibrate, which measures each stage's rate on this machine's own "
                          f"devices instead")
    if calibrate_seconds is not None:
        if not calibrate:
            raise OptionError("--calibrate-seconds: only with --calibrate")
        check_seconds(calibrate_seconds)


def plan_lines(ctx, tflops: float | None = None, devices: int | None = None, calibrate: bool = False,
               calibrate_seconds: float | None = None) -> list[str]:
    """The plan's lines. Hours at ``tflops`` x ``devices`` (default DEFAULT_TFLOPS x 1), or, with ``calibrate``,
    from each stage's unit of work timed here for ``calibrate_seconds`` (pipeline.calibrate)."""
    check_options(tflops, devices, calibrate, calibrate_seconds)
    tflops, devices = tflops or DEFAULT_TFLOPS, devices or 1
    cfg = ctx.cfg
    check(ctx)
    attacked = expected_attacked(ctx)
    work, size = _work(cfg, attacked), _bytes(cfg)
    counts = work_counts(cfg, attacked)
    flops = stage_flops(cfg, counts)
    cal = project(cfg, counts, calibrate_seconds or DEFAULT_SECONDS) if calibrate else None
    lines = [f"plan for {cfg.name} ({cfg.data.dataset}), store {ctx.store.root}:",
             "  classifier -> attacks -> activations -> purifier -> evaluate (and, on request, activations -> probes)"]
    if cal:
        m = cal["machine"]
        lines.append(f"  compute: FLOPs counted on the real modules for one example x the work (convolutions and "
                     f"matrix products); hours CALIBRATED on this machine ({m['device']}, {m['cpus']} CPUs, "
                     f"{m['gpus']} GPUs): each stage's unit of work timed for {cal['seconds_per_unit']:g} s, hours = "
                     f"FLOPs / the measured rate (--calibrate, not --tflops; Ray's start-up, data loading, the "
                     f"workers' start-up (the purifier's aside) and the shards' and checkpoints' writes not "
                     f"included)")
    else:
        lines.append(f"  compute: FLOPs counted on the real modules for one example x the work (convolutions and "
                     f"matrix products); hours at {tflops:g} TFLOP/s sustained x {devices} device(s) (--tflops, "
                     f"--devices)")
    for stage, state, where in status(ctx):
        lines += [f"- {stage} [{state}] {where}", f"    work:   {work[stage]}"]
        if cal:
            lines += [f"    FLOPs:  {flops[stage]:.3g} -> {_duration(cal['stages'][stage]['seconds'])} (calibrated)",
                      f"    rate:   {_rate_line(cal['stages'][stage])}"]
        else:
            lines.append(f"    FLOPs:  {flops[stage]:.3g} -> {_hours(flops[stage], tflops, devices)}")
        lines.append(f"    writes: {size[stage]}")
        if stage == "purifier" and cfg.data.dataset in PAPER_PURIFIER_MINUTES and not cal:
            a100 = flops[stage] / (8 * tflops * 1e12) / 60
            lines.append(f"    paper (Table 1): {PAPER_PURIFIER_MINUTES[cfg.data.dataset]} min on 8 A100; this "
                         f"projection on 8 devices at {tflops:g} TFLOP/s: {a100:.0f} min")
    e = estimate(cfg)
    total = e["attack_total_bytes"] + e["activation_total_bytes_raw"]
    main_stages = [k for k in flops if k not in ("per_example", "probes")]
    all_flops = sum(flops[k] for k in main_stages)
    lines.append(f"total shards + activations (raw): {total:,} B ({human_bytes(total)})")
    lines.append(_space_line(ctx))
    if cal:
        secs = sum(cal["stages"][k]["seconds"] for k in main_stages)
        lines.append(f"total compute: {all_flops:.3g} FLOPs -> {_duration(secs)} calibrated, the stages one after "
                     f"another (finished stages included; the probes, run on request, not)")
    else:
        lines.append(f"total compute: {all_flops:.3g} FLOPs -> {_hours(all_flops, tflops, devices)} at {tflops:g} "
                     f"TFLOP/s x {devices} (finished stages included; the probes, run on request, not)")
    return lines


def _rate_line(rec: dict) -> str:
    """``71.80 GFLOP/s = 35.90 GFLOP/s per worker x 2 worker(s) (cpu, 1 thread each); measured: ...``"""
    each = f"{rec['threads']} thread(s) each" if rec["device"] == "cpu" else "1 GPU each"
    units = "; ".join(f"{part}: {p['unit']} {p['flop_per_s'] / 1e9:.4g} GFLOP/s"
                      + (f" ({p['layout']}, started in {p['startup_s']:.1f} s)" if "layout" in p else "")
                      for part, p in rec["parts"].items())
    if rec["flop_per_s"] is None:
        return f"no work ({rec['workers']} worker(s), {rec['device']}, {each})"
    return (f"{rec['flop_per_s'] / 1e9:.4g} GFLOP/s = {rec['flop_per_s'] / rec['workers'] / 1e9:.4g} GFLOP/s per "
            f"worker x {rec['workers']} worker(s) ({rec['device']}, {each}); measured per worker: {units}")


def _space_line(ctx) -> str:
    """The free space under the store beside what the stages not finished write (what `pipeline run` checks)."""
    free = free_bytes(ctx.store.root)
    pending = pending_bytes(ctx, list(runner.STAGES))  # the small outputs (evaluate, probes) count 0
    need = sum(pending.values())
    line = (f"free space under {ctx.store.root}: {'unknown' if free is None else human_bytes(free)}; the stages not "
            f"finished write about {human_bytes(need)}" + (f" ({describe(pending, ctx)})" if need else ""))
    if free is not None and need > free:
        line += " -- too little: `pipeline run` stops before starting them (--no-space-check goes on anyway)"
    return line


# ---- what a stopped run had finished (the CLI's last line) -------------------------------------------------
def targets(ctx, stage: str, only: bool = False) -> list[str]:
    """The stages ``pipeline run --stage STAGE [--only]`` goes through, in order (as pipeline.runner.run)."""
    return runner.needed(ctx, "evaluate") if stage == "all" else [stage] if only else runner.needed(ctx, stage)


def _units_done(out) -> int:
    return len([u for u in out.done_units() if not u.startswith("_")]) if out is not None else 0


def _first_unfinished(ctx, stages: list[str]):
    """(the first of ``stages`` whose output is not complete, its output or None, the complete ones before it)."""
    done = []
    for s in stages:
        out = ctx.output_or_none(s)
        if out is None or not out.is_complete():
            return s, out, done
        done.append(s)
    return None, None, done


def stopped(ctx, stage: str, only: bool = False) -> str:
    """What a run stopped part-way had finished: ``attacks: 3 unit(s) finished and kept (classifier complete)``.
    Read from the store; never raises (it runs on the way out of a failed run)."""
    try:
        current, out, done = _first_unfinished(ctx, targets(ctx, stage, only))
        n = _units_done(out) if current is not None else 0
    except Exception:  # noqa: BLE001 - a message on the way out must not replace the error
        return "the finished units are kept"
    if current is None:
        return f"{', '.join(done)} complete"
    return f"{current}: {n} unit(s) finished and kept" + (f" ({', '.join(done)} complete)" if done else "")


def full_disk_line(ctx, stage: str, only: bool, err) -> str:
    """The one line for DiskFull: the file and the free space there, then what the stage being written still
    needs (``preflight.pending_bytes``: an estimate) and how many of its units are finished, and how to go on."""
    tail = "free space and run the same command again to resume"
    try:
        current, out, _ = _first_unfinished(ctx, targets(ctx, stage, only))
        if current is None:
            return f"{one_line(err)}; {tail}"
        n_train = training_images(ctx.cfg) if current in ("attacks", "activations") and ctx.output_or_none(
            "attacks", complete=True) is None else None
        need = pending_bytes(ctx, [current], n_train).get(current, 0)
        needs = f"{current} still needs about {human_bytes(need)} (estimate)" if need else f"{current} needs little"
        return f"{one_line(err)}; {needs}, {_units_done(out)} of its unit(s) finished and kept; {tail}"
    except Exception:  # noqa: BLE001 - a message on the way out must not replace the error
        return f"{one_line(err)}; {tail}"
