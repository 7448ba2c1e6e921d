"""Scenario (a) end to end on CPU at toy size, through the graph as a user runs it (the CLI, a local Ray):
`configs/cifar10.yaml` with a CIFAR-10 archive in the real python-pickle layout (written here), a WRN-28-10
checkpoint saved from RobustBench's own `DMWideResNet` (loaded with `classifier.source: file`), all 26 Table 5
layers cached, and the full-size purifier (106,381,537 parameters) trained for one step from the cached
activations. Only sizes and steps are reduced; every architecture is the paper's. The run stops after the purifier:
the evaluate stage is the same code as the toy job's (tests/test_evaluate_stage.py, tests/test_whole_job.py), on
networks whose forward and backward passes the attacks, activations and purifier stages already run at this size;
here it would cost a third of this test on CPU. (`activations_source: recompute` conditions identically to the cache:
tests/test_purifier_stage.py.)"""
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
        "purifier.beta_start_epoch=0", "purifier.beta_end_epoch=1", "purifier.batch_size=4", "purifier.workers=1"]


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
    files = {**train, "test_batch": _batch(xt, rng.integers(0, 10, N_TEST).tolist())}
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
    r = _run(scenario, "--stage", "purifier")
    assert r.returncode == 0, r.stderr[-4000:]
    assert "--stage purifier needs classifier, attacks, activations first" in r.stderr

    clf = _manifest(store, "classifier")
    assert clf["arch"] == "wrn-28-10" and clf["activation"] == "swish"
    acts = _manifest(store, "activations")
    assert acts["counts"]["layers"] == 26 and acts["counts"]["rows"] == 5 * 5 * N_TRAIN_PER_BATCH  # Table 5; 5 examples x 5 kinds
    pur = _manifest(store, "purifier", "cache")
    assert pur["counts"]["parameters"] == 106_381_537 and pur["counts"]["epochs"] == 1
    assert len(pur["inputs"]["layers"]) == 26

    # Cost at toy size, for the record (time per example per stage from the manifests; peak RSS of the
    # largest process of the run, Ray's workers included)
    per_example = {
        "classifier (test PGD-1 per test point)": clf["timings"]["total_s"] / N_TEST,
        "attacks (per training example)": _manifest(store, "attacks")["timings"]["total_s"] / (5 * N_TRAIN_PER_BATCH),
        "activations (per sample)": acts["timings"]["total_s"] / (25 * N_TRAIN_PER_BATCH),
        "purifier (per trained example)": pur["timings"]["total_s"] / 4}
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({"seconds_per_example": {k: round(v, 2) for k, v in per_example.items()},
                      "peak_rss_mib": round(peak)}, indent=1))
