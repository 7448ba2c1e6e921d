"""The evaluation's speed, code against code and layout against layout, side by side in one run: the evaluation of a
few test points (``pipeline.evaluation.evaluate_chunk``: CARSO's clean draws, its diagnostics, randomised AutoAttack
and PGD+EOT) on the same stored models, test points and settings, each variant in a process of its own, the variants
alternating round after round (these machines are noisy: read the ratios), or with ``--parallel`` running at the
same time, one process each, as the evaluation's workers share a machine. The classifier-alone baseline (clean +
standard AutoAttack) is timed apart, since a sweep computes it once and reuses it.

Variants: ``ref`` (the code of a git revision, checked out with ``git worktree`` and imported from there),
``reference`` and ``fast`` (this checkout's ``eval.kernels``: as written, or channels-last with the purifier's
BatchNorms folded), each optionally ``@N``: the points in chunks of N (``eval.chunk_size``), each chunk seeded as the
pipeline seeds it (by its first point's absolute index), instead of all in one chunk.
Each variant's outcomes are compared with the first one's (``identical``, or which fields differ; another chunk
layout draws other seeds), and each variant's C/randAA accuracy on the points.

    .venv/bin/python bench/eval_speed.py --store runs --config configs/fmnist.yaml [--set KEY=VALUE ...]
        [--first 5000] [--points 10] [--rounds 2] [--ref c46fa94^] [--variants ref,reference,fast]
        [--threads T] [--parallel]

The store must hold the config's classifier and purifier (``pipeline run --stage purifier``). Prints JSON.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Runs inside each variant's process, importing the variant's own code (sys.path[0] is its checkout).
WORKER = r"""
import json, sys, time
from pathlib import Path
import numpy as np, torch
from pipeline.cluster import prepare_worker
from pipeline.config import EvalConfig
from pipeline.defense import CarsoWeights
from pipeline.evaluation import classifier_baseline, evaluate_chunk
from pipeline.models import StoredClassifier
from pipeline.models.purifier import PurifierSpec

d, kernels, threads, chunk = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
prepare_worker(threads)
meta = json.loads((d / "meta.json").read_text())
known = {f.name for f in __import__("dataclasses").fields(EvalConfig)}
ev = EvalConfig(**{k: v for k, v in meta["eval"].items() if k in known})
clf = StoredClassifier(arch=meta["arch"], activation=meta["activation"], dataset=meta["dataset"],
                       state_dict=torch.load(d / "classifier.pt", weights_only=True), weights_sha256=meta["sha256"])
weights = CarsoWeights(clf, PurifierSpec.from_json(meta["purifier"]), torch.load(d / "purifier.pt", weights_only=True))
kw = {} if kernels == "ref" else {"kernels": kernels}
classifier, carso = weights.build("cpu", samples=ev.samples, aggregation=ev.aggregation, precision=ev.precision, **kw)
torch.set_grad_enabled(True)
x = torch.from_numpy(np.load(d / "x.npy")).float() / 255
y = torch.from_numpy(np.load(d / "y.npy")).long()
base_s = chunk_s = 0.0
results = []
for i in range(0, len(y), chunk):  # the points in chunks of ``chunk``, each seeded as the pipeline seeds it
    xs, ys, seed = x[i:i + chunk], y[i:i + chunk], meta["seeds"][i]
    t0 = time.perf_counter()
    baseline = classifier_baseline(classifier, xs, ys, ev, seed, "cpu")
    t1 = time.perf_counter()
    results.append(evaluate_chunk(classifier, carso, xs, ys, ev, seed, "cpu", baseline=baseline))
    base_s, chunk_s = base_s + t1 - t0, chunk_s + time.perf_counter() - t1
import pipeline
print(json.dumps({"baseline_s": base_s, "chunk_s": chunk_s, "result": results, "code": pipeline.__file__}))
"""


def export(args, folder: Path) -> dict:
    """The stored classifier's and purifier's weights, the points and the settings, as files every variant reads."""
    import numpy as np
    import torch

    from pipeline import runner
    from pipeline.config import load_config
    from pipeline.data import load_split
    from pipeline.models import classifier_payload
    from stages.evaluate import _purifier_state, chunk_seed

    cfg = load_config(REPO / args.config if not Path(args.config).is_absolute() else args.config, args.set)
    ctx = runner.Context(cfg=cfg, store=runner.store_root(args.store), log=lambda m: None)
    clf, pur = ctx.output("classifier"), ctx.output("purifier")
    for out in (clf, pur):
        if not out.is_complete():
            sys.exit(f"error: {out.dir}: no finished {out.stage} output for {args.config}; run `pipeline run "
                     f"--stage purifier` on this store first")
    payload = classifier_payload(clf, cfg.data.dataset)
    torch.save(payload.state_dict, folder / "classifier.pt")
    torch.save(_purifier_state(pur), folder / "purifier.pt")
    x, y = load_split(cfg.data.dataset, "test", cfg.data.data_dir, cfg.data.test_subset)
    np.save(folder / "x.npy", x[args.first:args.first + args.points].numpy())
    np.save(folder / "y.npy", y[args.first:args.first + args.points].numpy())
    meta = {"arch": payload.arch, "activation": payload.activation, "dataset": payload.dataset,
            "sha256": payload.weights_sha256, "purifier": pur.manifest()["model"],
            "eval": dataclasses.asdict(cfg.eval),
            "seeds": [chunk_seed(cfg.eval.seed, args.first + i) for i in range(args.points)]}
    (folder / "meta.json").write_text(json.dumps(meta))
    return meta


def checkout(rev: str, folder: Path) -> Path:
    path = folder / "ref"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(path), rev], check=True)
    return path


def accuracies(results: list[dict]) -> dict:
    """Each CARSO attack's fresh-draw mean accuracy on the points (its ``fresh`` rows: draws x points, per chunk)."""
    hits: dict[str, list[int]] = {}
    for res in results:
        for name, rec in res.items():
            if isinstance(rec, dict) and "fresh" in rec:
                h = hits.setdefault(name, [0, 0])
                h[0] += sum(map(sum, rec["fresh"]))
                h[1] += sum(map(len, rec["fresh"]))
    return {name: round(h[0] / h[1], 4) for name, h in hits.items()}


def parse_variant(text: str, default_chunk: int) -> tuple[str, str, int]:
    """``kernels[@chunk]`` -> (label, kernels, chunk size)."""
    kernels, _, chunk = text.partition("@")
    if kernels not in ("ref", "reference", "fast"):
        sys.exit(f"error: --variants: unknown variant {kernels!r} (choose from ref, reference, fast)")
    try:
        size = int(chunk) if chunk else default_chunk
    except ValueError:
        size = 0
    if size < 1:
        sys.exit(f"error: --variants: {text!r}: the chunk size after '@' must be a positive integer")
    return text, kernels, size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", default="runs")
    ap.add_argument("--config", default="configs/fmnist.yaml")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--first", type=int, default=5000, help="first test point (default: not a reported point)")
    ap.add_argument("--points", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--ref", default="c46fa94^", help="git revision run as the reference (default: the code "
                                                       "before bench/efficiency.py, issue 27's filing)")
    ap.add_argument("--variants", default="ref,reference,fast",
                    help="comma-separated; each 'kernels' or 'kernels@chunk' (the points in chunks of that size, "
                         "default all in one)")
    ap.add_argument("--parallel", action="store_true",
                    help="run each round's variants at the same time, one process each (as the evaluation's "
                         "workers share a machine), instead of one after the other")
    args = ap.parse_args()
    specs = {label: (kernels, size) for label, kernels, size in
             (parse_variant(v, args.points) for v in args.variants.split(","))}
    variants = list(specs)
    with tempfile.TemporaryDirectory(prefix="eval-speed-") as tmp:
        folder = Path(tmp)
        meta = export(args, folder)
        code = {"reference": REPO, "fast": REPO}
        if any(k == "ref" for k, _ in specs.values()):
            code["ref"] = checkout(args.ref, folder)
        try:
            runs: dict[str, list[dict]] = {v: [] for v in variants}
            for r in range(args.rounds):
                batches = [variants] if args.parallel else [[v] for v in variants]
                for batch in batches:
                    procs = {}
                    for v in batch:
                        kernels, size = specs[v]
                        env = {**os.environ, "PYTHONPATH": str(code[kernels])}
                        procs[v] = subprocess.Popen([sys.executable, "-c", WORKER, str(folder), kernels,
                                                     str(args.threads), str(size)], cwd=code[kernels], env=env,
                                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                    for v, p in procs.items():
                        out, err = p.communicate()
                        if p.returncode != 0:
                            sys.exit(f"error: variant {v}: {err.strip().splitlines()[-1] if err else p.returncode}")
                        runs[v].append(json.loads(out.strip().splitlines()[-1]))
                        where = code[specs[v][0]]
                        if not Path(runs[v][-1]["code"]).resolve().is_relative_to(Path(where).resolve()):
                            sys.exit(f"error: variant {v} imported {runs[v][-1]['code']}, not its checkout {where}")
                        print(f"[eval_speed] round {r + 1}/{args.rounds} {v}: evaluation {runs[v][-1]['chunk_s']:.1f} s, "
                              f"baseline {runs[v][-1]['baseline_s']:.1f} s", file=sys.stderr, flush=True)
        finally:
            if "ref" in code:
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(code["ref"])])
    first = variants[0]
    ref_out = runs[first][0]["result"]
    report = {}
    for v in variants:
        chunk = statistics.median(r["chunk_s"] for r in runs[v])
        res = runs[v][0]["result"]
        same = res == ref_out
        rec = {"evaluation_s": [round(r["chunk_s"], 2) for r in runs[v]], "evaluation_median_s": round(chunk, 2),
               "baseline_s": [round(r["baseline_s"], 2) for r in runs[v]],
               "speedup_vs_" + first: round(statistics.median(r["chunk_s"] for r in runs[first]) / chunk, 3),
               "outcomes_vs_" + first: "identical" if same else "differ",
               "accuracy": accuracies(res)}
        if not same and len(res) == len(ref_out):
            rec["differing_fields"] = sorted({k for a, b in zip(res, ref_out) for k in set(a) | set(b)
                                              if a.get(k) != b.get(k)})
        elif not same:
            rec["differing_fields"] = "another chunk layout (other chunk seeds)"
        report[v] = rec
    print(json.dumps({"config": args.config, "sets": args.set, "points": [args.first, args.first + args.points],
                      "threads": args.threads, "parallel": args.parallel, "ref": args.ref,
                      "chunk_sizes": {v: specs[v][1] for v in variants}, "samples": meta["eval"]["samples"],
                      "eval": {k: meta["eval"][k] for k in ("aa_steps", "aa_eot", "pgd_eot_steps", "pgd_eot_iters",
                                                             "fresh_draws", "eps")},
                      "variants": report}, indent=1))


if __name__ == "__main__":
    main()
