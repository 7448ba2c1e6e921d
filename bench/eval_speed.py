"""The evaluation's speed, code against code and layout against layout, side by side in one run: one evaluation chunk
(``pipeline.evaluation.evaluate_chunk``: CARSO's clean draws, its diagnostics, randomised AutoAttack and PGD+EOT)
on the same stored models, test points and settings, each variant in a process of its own, the variants
alternating round after round (these machines are noisy: read the ratios). The classifier-alone baseline
(clean + standard AutoAttack) is timed apart, once per variant, since a sweep computes it once and reuses it.

Variants: ``ref`` (the code of a git revision, checked out with ``git worktree`` and imported from there),
``reference`` and ``fast`` (this checkout's ``eval.kernels``: as written, or channels-last with the purifier's
BatchNorms folded).
Each variant's per-point outcomes are compared with the first one's: ``identical`` or the number of points whose
outcome differs, and each variant's C/randAA accuracy on the chunk.

    .venv/bin/python bench/eval_speed.py --store runs --config configs/fmnist.yaml [--set KEY=VALUE ...]
        [--first 5000] [--points 10] [--rounds 2] [--ref c46fa94^] [--variants ref,reference,fast]

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

d, kernels, threads = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
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
t0 = time.perf_counter()
baseline = classifier_baseline(classifier, x, y, ev, meta["seed"], "cpu")
t1 = time.perf_counter()
res = evaluate_chunk(classifier, carso, x, y, ev, meta["seed"], "cpu", baseline=baseline)
t2 = time.perf_counter()
import pipeline
print(json.dumps({"baseline_s": t1 - t0, "chunk_s": t2 - t1, "result": res, "code": pipeline.__file__}))
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
            "eval": dataclasses.asdict(cfg.eval), "seed": chunk_seed(cfg.eval.seed, args.first)}
    (folder / "meta.json").write_text(json.dumps(meta))
    return meta


def checkout(rev: str, folder: Path) -> Path:
    path = folder / "ref"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(path), rev], check=True)
    return path


def accuracies(res: dict) -> dict:
    """Each CARSO attack's fresh-draw mean accuracy on the chunk (its ``fresh`` rows: draws x points)."""
    out = {}
    for name, rec in res.items():
        if isinstance(rec, dict) and "fresh" in rec:
            rows = rec["fresh"]
            out[name] = round(sum(map(sum, rows)) / sum(map(len, rows)), 4)
    return out


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
    ap.add_argument("--variants", default="ref,reference,fast")
    args = ap.parse_args()
    variants = args.variants.split(",")
    with tempfile.TemporaryDirectory(prefix="eval-speed-") as tmp:
        folder = Path(tmp)
        meta = export(args, folder)
        code = {"reference": REPO, "fast": REPO}
        if "ref" in variants:
            code["ref"] = checkout(args.ref, folder)
        try:
            runs: dict[str, list[dict]] = {v: [] for v in variants}
            for r in range(args.rounds):
                for v in variants:
                    env = {**os.environ, "PYTHONPATH": str(code[v])}
                    p = subprocess.run([sys.executable, "-c", WORKER, str(folder), v,
                                        str(args.threads)], cwd=code[v], env=env, capture_output=True, text=True)
                    if p.returncode != 0:
                        sys.exit(f"error: variant {v}: {p.stderr.strip().splitlines()[-1] if p.stderr else p.returncode}")
                    runs[v].append(json.loads(p.stdout.strip().splitlines()[-1]))
                    if not Path(runs[v][-1]["code"]).resolve().is_relative_to(Path(code[v]).resolve()):
                        sys.exit(f"error: variant {v} imported {runs[v][-1]['code']}, not its checkout {code[v]}")
                    print(f"[eval_speed] round {r + 1}/{args.rounds} {v}: chunk {runs[v][-1]['chunk_s']:.1f} s, "
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
        rec = {"chunk_s": [round(r["chunk_s"], 2) for r in runs[v]], "chunk_median_s": round(chunk, 2),
               "baseline_s": [round(r["baseline_s"], 2) for r in runs[v]],
               "speedup_vs_" + first: round(statistics.median(r["chunk_s"] for r in runs[first]) / chunk, 3),
               "outcomes_vs_" + first: "identical" if same else "differ",
               "accuracy": accuracies(res)}
        if not same:
            rec["differing_fields"] = sorted(k for k in set(res) | set(ref_out) if res.get(k) != ref_out.get(k))
        report[v] = rec
    print(json.dumps({"config": args.config, "sets": args.set, "points": [args.first, args.first + args.points],
                      "threads": args.threads, "ref": args.ref, "samples": meta["eval"]["samples"],
                      "eval": {k: meta["eval"][k] for k in ("aa_steps", "aa_eot", "pgd_eot_steps", "pgd_eot_iters",
                                                             "fresh_draws", "eps")},
                      "variants": report}, indent=1))


if __name__ == "__main__":
    main()
