"""Scenario (a) end to end on CPU at toy size, through the whole graph as a user runs it (the CLI, a local Ray):
`configs/cifar10.yaml` with a CIFAR-10 archive in the real python-pickle layout (written here), a WRN-28-10
checkpoint saved from RobustBench's own `DMWideResNet` (loaded with `classifier.source: file`), all 26 Table 5
layers cached, the full-size purifier (106,381,537 parameters) trained for one step from the cached activations,
and the evaluation on 1 point with 1-step attacks. Only sizes and steps are reduced; every architecture is the
paper's. (`activations_source: recompute` conditions identically to the cache: tests/test_purifier_stage.py.)"""
import io
import json
import pickle
import resource
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch

from tests.conftest import REPO
from tests.test_models import _robustbench_wrn

N_TRAIN_PER_BATCH, N_TEST = 1, 2  # 5 data batches -> 5 training images; 2 test points

SETS = ["attack.n_examples=null", "attack.shard_size=10", "attack.batch_size=10", "attack.pgd_steps=1",
        "activations.chunk_rows=10", "activations.batch_size=10", "classifier.train.eval_pgd_steps=1",
        "purifier.epochs=1", "purifier.warmup_epochs=0", "purifier.plateau_epochs=0", "purifier.anneal_epochs=1",
        "purifier.beta_start_epoch=0", "purifier.beta_end_epoch=1", "purifier.batch_size=4", "purifier.workers=1",
        "eval.n_examples=1", "eval.chunk_size=1", "eval.samples=2", "eval.aa_steps=1", "eval.aa_eot=1",
        "eval.pgd_eot_steps=1", "eval.pgd_eot_iters=1", "eval.fresh_draws=1", "eval.batch_size=2"]


def _batch(x: np.ndarray, y: list[int]) -> bytes:
    d = {b"batch_label": b"fixture", b"data": x.reshape(len(x), 3072), b"labels": [int(v) for v in y]}
    return pickle.dumps(d, protocol=2)


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
    root = tmp_path_factory.mktemp("scenario_a")
    torch.manual_seed(0)
    rb = _robustbench_wrn().eval()  # RobustBench's own architecture: its state_dict is RobustBench's layout
    ckpt = root / "Cui2023Decoupled_WRN-28-10.pt"
    torch.save(rb.state_dict(), ckpt)
    rng = np.random.default_rng(0)
    train = {f"data_batch_{i}": _batch(rng.integers(0, 256, (N_TRAIN_PER_BATCH, 3, 32, 32), dtype=np.uint8),
                                       rng.integers(0, 10, N_TRAIN_PER_BATCH).tolist()) for i in range(1, 6)}
    xt = rng.integers(0, 256, (N_TEST, 3, 32, 32), dtype=np.uint8)
    with torch.no_grad():
        pred = rb(torch.from_numpy(xt).float() / 255).argmax(1).tolist()
    # Both points labelled against the classifier's prediction: the standard AutoAttack of the baseline (full
    # strength, up to 5,000 Square queries per point it cannot break) then has nothing to attack, which keeps
    # this test in CI's budget; CARSO's own attacks run wherever its reconstructions are classified correctly.
    files = {**train, "test_batch": _batch(xt, [(k + 1) % 10 for k in pred])}
    data = root / "data"
    data.mkdir()
    with tarfile.open(data / "cifar-10-python.tar.gz", "w:gz") as tf:
        for name, blob in files.items():
            ti = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            ti.size = len(blob)
            tf.addfile(ti, io.BytesIO(blob))
    yield {"root": root, "data": data, "ckpt": ckpt}
    shutil.rmtree(root, ignore_errors=True)  # ~2.5 GB: the full-size purifier with its optimizer checkpoint


def _run(scenario, *args):
    sets = [f"data.data_dir={scenario['data']}", "classifier.source=file", f"classifier.path={scenario['ckpt']}",
            *SETS]
    cmd = [sys.executable, "-m", "pipeline.cli", "run", "--config", "configs/cifar10.yaml", "--store",
           str(scenario["root"] / "store"), *[a for s in sets for a in ("--set", s)], *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)


def _manifest(store, stage, source=None):
    found = [json.loads(p.read_text()) for p in store.glob(f"cifar10/{stage}/*/manifest.json")]
    if source:
        found = [m for m in found if m["inputs"]["source"] == source]
    assert len(found) == 1, f"{stage}: {len(found)} outputs"
    return found[0]


@pytest.mark.slow
def test_scenario_a_runs_end_to_end_on_cpu(scenario):
    store = scenario["root"] / "store"
    r = _run(scenario, "--stage", "all")
    assert r.returncode == 0, r.stderr[-4000:]

    clf = _manifest(store, "classifier")
    assert clf["arch"] == "wrn-28-10" and clf["activation"] == "swish"
    acts = _manifest(store, "activations")
    assert acts["counts"]["layers"] == 26 and acts["counts"]["rows"] == 5 * 5 * N_TRAIN_PER_BATCH  # Table 5; 5 examples x 5 kinds
    pur = _manifest(store, "purifier", "cache")
    assert pur["counts"]["parameters"] == 106_381_537 and pur["counts"]["epochs"] == 1
    assert len(pur["inputs"]["layers"]) == 26
    ev = _manifest(store, "evaluate")
    (report,) = store.glob("cifar10/evaluate/*/report.md")
    text = report.read_text()
    for column in ("AT/Cl", "C/Cl", "AT/AA", "C/randAA"):  # the paper's Table 2 columns
        assert column in text
    results = json.loads((report.parent / "results.json").read_text())
    assert results["points"] == 1 and results["reduced_strength"]

    # Cost at toy size, for the record (time per example per stage from the manifests; peak RSS of the
    # largest process of the two runs, Ray's workers included)
    per_example = {
        "classifier (test PGD-1 per test point)": clf["timings"]["total_s"] / N_TEST,
        "attacks (per training example)": _manifest(store, "attacks")["timings"]["total_s"] / (5 * N_TRAIN_PER_BATCH),
        "activations (per sample)": acts["timings"]["total_s"] / (25 * N_TRAIN_PER_BATCH),
        "purifier (per trained example)": pur["timings"]["total_s"] / 4,
        "evaluate (per point)": ev["timings"]["total_s"]}
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({"seconds_per_example": {k: round(v, 2) for k, v in per_example.items()},
                      "peak_rss_mib": round(peak)}, indent=1))
