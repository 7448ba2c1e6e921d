"""Stage `evaluate`: CARSO and the classifier alone under attack, on Ray tasks over test-set chunks.

Chunk c holds test points [first + c*K, first + (c+1)*K) (K = ``eval.chunk_size``, first =
``eval.first_example``) and is evaluated with the seed ``8 * (eval.seed * 100003 + i)``, i the absolute test index
of its first point, whatever task runs it: the merged result does not depend on the number of workers, and points 0-199
evaluated as two runs (0-99, 100-199) get exactly the chunks of one run over 0-199 (K dividing 100). Each finished chunk writes its per-point outcomes (``chunks/chunk-NNNN.json``) and a receipt; a
killed evaluation resumes from the finished chunks. The merge counts every chunk exactly once.
Outputs: ``results.json``, ``report.md``, ``reconstructions.png``.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from pipeline import report
from pipeline.cluster import default_workers, device_for, prepare_worker, worker_resources
from pipeline.config import EvalConfig, fingerprint
from pipeline.context import Context, classifier_identity, data_identity
from pipeline.data import DataError, load_split, to_float
from pipeline.defense import CarsoWeights
from pipeline.evaluation import SEED_OFFSETS, check_backend, classifier_baseline, evaluate_chunk
from pipeline.log import Follow, Progress, human_seconds
from pipeline.models import classifier_payload
from pipeline.models.purifier import PurifierSpec
from pipeline.store import (
    Output,
    StoreError,
    atomic_file,
    atomic_write_json,
    file_record,
    read_sealed_json,
    require_intact,
    write_sealed_json,
)
from stages import _pool
from stages._pool import unbox

GRID_EXAMPLES = 8
PROGRESS = "progress.log"  # a running evaluation's lines, one per finished part of a chunk (removed at the end)


# Code version of this stage, part of its store key (pipeline.context.Context.key): bump it whenever a change
# alters what the stage writes.
# 2: diagnostics (purification, stochasticity, training) in chunks, results.json and report.md; randAA's clean
#    pass seeded; samples.png; all N reconstructions in examples.npz.
# 3: report.md's training line no longer says "the decoder ignores z" whatever the number of active units (it
#    contradicted reports with many active units); every number is as version 2 computes it.
# 4: chunks seeded by the absolute test index of their first point (was: the chunk's position in the run), so a
#    run split by points merges exactly into the one-run figure. Re-seeds every stored evaluation (the attacks'
#    random starts and CARSO's draws change; the settings do not).
# 5: eval.kernels ("fast" by default: CARSO channels-last with its purifier's BatchNorms folded, the same function
#    with float32 sums in another order); the logit-surrogate PGD+EOT runs at eval.precision (under bfloat16 it
#    ran float32). eval.kernels=reference computes every float32 number as version 4 does.
VERSION = 5
# Code version of the classifier-alone baseline (clean accuracy and standard AutoAttack of a chunk), part of its
# cache key: bump it only when a change alters those numbers (evaluate 3 did not; its baselines are version 2's).
BASELINE_VERSION = 2
UPSTREAM = ("classifier", "attacks", "purifier")


# The spec (pipeline/spec.py): every evaluation setting, the test points, the purifier and the classifier's
# weights (inputs).
READS = ("data.dataset", "data.test_subset", "eval.eps", "eval.first_example", "eval.n_examples", "eval.samples",
         "eval.aggregation", "eval.aa_steps", "eval.aa_eot", "eval.pgd_eot_steps", "eval.pgd_eot_step_size",
         "eval.pgd_eot_iters", "eval.pgd_eot_logit_surrogate", "eval.obfuscation_eps", "eval.fresh_draws",
         "eval.backend", "eval.chunk_size", "eval.batch_size", "eval.seed", "eval.precision",
         "eval.kernels")


def inputs(ctx: Context) -> dict:
    return {"purifier": ctx.upstream("purifier").key, "weights_sha256": classifier_identity(ctx)["weights_sha256"]}


# Each chunk's random streams are the chunk seed + pipeline.evaluation.SEED_OFFSETS: chunk seeds SEED_STRIDE apart
# never share one, whatever the chunk size.
SEED_STRIDE = 8
assert max(SEED_OFFSETS.values()) < SEED_STRIDE, "a chunk's seed offsets would reach the next chunk's seed"


def chunk_seed(seed: int, first_point: int) -> int:
    """The seed of the chunk whose first point is test index ``first_point`` (absolute, not the run's offset)."""
    return (seed * 100003 + first_point) * SEED_STRIDE


def _purifier_state(pur: Output) -> dict:
    """purifier.pt, checked against its manifest (size and sha256) before it is unpickled (weights only)."""
    rec = next((r for r in pur.manifest()["files"] if r["name"] == "purifier.pt"), None)
    if rec is None:
        raise StoreError(f"{pur.manifest_path}: lists no purifier.pt")
    require_intact(pur, rec)
    return torch.load(pur.dir / "purifier.pt", map_location="cpu", weights_only=True)


def baseline_path(ctx: Context, lo: int, hi: int, seed: int) -> Path:
    """Where the classifier-alone results (clean + standard AutoAttack) of test points [lo, hi) are kept: keyed by
    everything they depend on (classifier weights, the points, eps, seed, backend, batch size), so every purifier,
    aggregation and attack setting of a sweep reuses them."""
    ev = ctx.cfg.eval
    # The field keeps its old name ("evaluate_version") so the baselines evaluate 2 wrote keep their keys.
    k = fingerprint({"classifier": classifier_identity(ctx)["weights_sha256"],
                     "test": data_identity(ctx.cfg, "test"), "points": [lo, hi], "eps": ev.eps, "seed": seed,
                     "backend": ev.backend, "batch_size": ev.batch_size, "evaluate_version": BASELINE_VERSION})
    return ctx.store.root / ctx.cfg.data.dataset / "baseline" / f"{k}.json"


def evaluate_task(weights_box, data_box, out_dir: str, c: int, lo: int, hi: int, ev: EvalConfig, device: str,
                  threads: int, baseline_file: str) -> dict:
    """One chunk, inside a Ray task: evaluate (reusing the classifier baseline when it is known), write the chunk
    file and its receipt. ``lo``/``hi`` index the evaluated points (``data_box``); the seed comes from the absolute
    test index ``eval.first_example + lo``."""
    prepare_worker(threads)
    classifier, carso = unbox(weights_box).build(device, samples=ev.samples, aggregation=ev.aggregation,
                                                 precision=ev.precision, kernels=ev.kernels)
    torch.set_grad_enabled(True)
    x, y = unbox(data_box)
    t0 = time.perf_counter()
    xc, yc, seed = to_float(x[lo:hi]), y[lo:hi], chunk_seed(ev.seed, ev.first_example + lo)
    out = Output(Path(out_dir), "evaluate", "")
    first = ev.first_example + lo

    def done(what: str) -> None:  # one line for the driver to print (PROGRESS); whole lines, appended at once
        line = (f"[evaluate] chunk {c} (test points {first}-{first + hi - lo - 1}): {what} done, "
                f"{human_seconds(time.perf_counter() - t0)} into the chunk\n")
        try:
            with open(out.dir / PROGRESS, "a") as f:
                f.write(line)
        except OSError:  # progress only: a full disk is reported by the chunk's own write
            pass

    baseline = read_sealed_json(Path(baseline_file))
    if baseline is None:
        baseline = classifier_baseline(classifier, xc, yc, ev, seed, device)
        write_sealed_json(Path(baseline_file), baseline)
        done("the classifier's standard AutoAttack")
    res = evaluate_chunk(classifier, carso, xc, yc, ev, seed, device, keep_examples=GRID_EXAMPLES if c == 0 else 0,
                         baseline=baseline, done=done)
    files = []
    ex = res.pop("examples", None)
    if ex is not None:
        p = out.dir / "chunks" / "examples.npz"
        p.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(p) as tmp, open(tmp, "wb") as f:
            np.savez(f, **{k: v.numpy() for k, v in ex.items()})
        files.append(p)
    res.update({"chunk": c, "range": [lo, hi], "seconds": time.perf_counter() - t0})
    p = out.dir / "chunks" / f"chunk-{c:04d}.json"
    p.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(p, res)
    files.append(p)
    out.write_receipt(f"chunk-{c:04d}", files, n=hi - lo)
    return {"chunk": c, "n": hi - lo}


def run(ctx: Context, out: Output) -> None:
    import ray

    cfg, ev = ctx.cfg, ctx.cfg.eval
    check_backend(ev.backend)
    t0 = time.perf_counter()
    x, y = load_split(cfg.data.dataset, "test", cfg.data.data_dir, cfg.data.test_subset)
    first = ev.first_example
    if first >= len(y):
        raise DataError(f"eval.first_example={first}: the {cfg.data.dataset} test split has {len(y)} points")
    if ev.n_examples and first + ev.n_examples > len(y):
        raise DataError(f"eval.n_examples={ev.n_examples} from eval.first_example={first}: the {cfg.data.dataset} "
                        f"test split has {len(y)} points")
    n = ev.n_examples or len(y) - first
    x, y = x[first:first + n], y[first:first + n]
    # Chunk ranges are positions within the evaluated points; the report names the absolute test indices.
    chunks = [(c, lo, min(lo + ev.chunk_size, n)) for c, lo in enumerate(range(0, n, ev.chunk_size))]
    done = out.done_units()
    todo = [ch for ch in chunks if f"chunk-{ch[0]:04d}" not in done]
    if done:
        ctx.log(f"[evaluate] {len(chunks) - len(todo)} of {len(chunks)} chunk(s) already finished")
    pur = ctx.upstream("purifier")
    ctx.ray()
    # Default: every GPU, or every CPU core (one single-threaded chunk per core): chunks are independent.
    workers = max(1, min(ctx.workers or default_workers(), max(1, len(todo))))
    res = worker_resources(workers)
    weights = CarsoWeights(classifier_payload(ctx.upstream("classifier"), cfg.data.dataset),
                           PurifierSpec.from_json(pur.manifest()["model"]), _purifier_state(pur))
    ctx.log(f"[evaluate] {n} test points in {len(chunks)} chunk(s) on {workers} worker(s) ({device_for(res)}), "
            f"eps {ev.eps:g}; randAA {ev.aa_steps} steps x EOT {ev.aa_eot}; PGD+EOT {ev.pgd_eot_steps} x "
            f"{ev.pgd_eot_step_size:g}, EOT {ev.pgd_eot_iters}; {ev.samples} samples/input, {ev.aggregation} aggregation")
    if todo and ctx.workers and ctx.workers > len(todo):
        ctx.log(f"[evaluate] {len(todo)} chunk(s) to run for {ctx.workers} workers: a chunk is the unit of "
                f"parallelism, so a smaller eval.chunk_size would use them all (it changes the key and the seeds)")
    task = ray.remote(evaluate_task).options(num_cpus=res["num_cpus"], num_gpus=res["num_gpus"], max_retries=1)
    wbox, dbox = _pool.ref_box(weights), _pool.ref_box((x, y))
    progress = Progress("evaluate", n, "points", every=0, log=ctx.log,  # chunks take minutes
                        done=sum(hi - lo for c, lo, hi in chunks if f"chunk-{c:04d}" in done))
    pending = [task.remote(wbox, dbox, str(out.dir), c, lo, hi, ev, device_for(res), int(res["num_cpus"]),
                           str(baseline_path(ctx, first + lo, first + hi, chunk_seed(ev.seed, first + lo)).resolve()))
               for c, lo, hi in todo]
    training = pur.manifest()["final_metrics"]
    with Follow(out.dir / PROGRESS, ctx.log, every=5.0):  # each chunk's parts as they finish
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            progress.update(ray.get(ready[0])["n"])
            if pending:  # the numbers so far, so a long evaluation stopped early still tells what it measured
                finished = [ch for ch in chunks if f"chunk-{ch[0]:04d}" in out.done_units()]
                ctx.log(f"[evaluate] so far, {report.running_line(report.merge(out, cfg, finished, training=training))}")
    (out.dir / PROGRESS).unlink(missing_ok=True)

    results = report.merge(out, cfg, chunks, training=training)
    results["timings"] = {"total_s": time.perf_counter() - t0}
    atomic_write_json(out.dir / "results.json", results)
    (out.dir / "report.md").write_text(report.markdown(results))
    names = ["results.json", "report.md"]
    if report.grid(out.dir / "chunks" / "examples.npz", out.dir / "reconstructions.png"):
        names.append("reconstructions.png")
    if report.samples_grid(out.dir / "chunks" / "examples.npz", out.dir / "samples.png"):
        names.append("samples.png")
    files = [f for r in out.receipts() for f in r["files"]] + [file_record(out.dir, out.dir / nm) for nm in names]
    out.finalize(inputs={"purifier": pur.key, "test": data_identity(cfg, "test")},
                 files=files, counts={"points": n, "chunks": len(chunks)}, timings=results["timings"],
                 extra={"summary": results["summary"], "reduced_strength": results["reduced_strength"]})
    for line in report.summary_lines(results):
        ctx.log(f"[evaluate] {line}")
