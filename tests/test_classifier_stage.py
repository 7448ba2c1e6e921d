"""The `classifier` stage end to end through the CLI, on a real local Ray instance and a real store."""
import json
import shutil

import pytest

from tests.conftest import CLF, cli, cli_args, cli_here


@pytest.mark.slow
def test_classifier_train_then_cache_hit_then_file_source(tmp_path, trained_classifier, toy):
    """The shared classifier was trained by the toy job's `pipeline run` (tests/conftest.py): its output and
    console are checked here, then `--stage classifier` on a copy is a cache hit without Ray, and the stored
    weights used as a local checkpoint give the same weights hash."""
    data, shared = trained_classifier
    store = tmp_path / "store"
    shutil.copytree(shared, store)
    (out,) = list((store / "fmnist" / "classifier").iterdir())
    manifest = json.loads((out / "manifest.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert {f["name"] for f in manifest["files"]} == {"model.pt", "metrics.json"}
    assert 0 <= metrics["pgd_acc"] <= metrics["clean_acc"] <= 1 and metrics["n"] == 64  # data.test_subset
    assert metrics["attack"]["eps"] == 0.1 and metrics["weights_sha256"] == manifest["weights_sha256"]
    console = toy.runs["job"]["stderr"]
    assert f"[classifier] running -> {toy.store / 'fmnist' / 'classifier' / out.name}" in console
    assert "[classifier] epoch 1/1: adversarial loss" in console

    common = cli_args(store, data, sets=CLF)
    again = cli_here("run", "--stage", "classifier", *common)  # in this process: it fails if it starts Ray
    assert again.returncode == 0 and "cache hit" in again.stderr and "[ray]" not in again.stderr

    st = cli_here("status", *common)
    assert st.returncode == 0 and "classifier" in st.stdout and "complete" in st.stdout

    # The stored weights, used as a local checkpoint, give the same weights hash (and a new classifier key).
    r = cli("run", "--stage", "classifier", *common, "--set", "classifier.source=file",
            "--set", f"classifier.path={out / 'model.pt'}")
    assert r.returncode == 0, r.stderr
    outs = [p for p in (store / "fmnist" / "classifier").iterdir() if p != out]
    assert json.loads((outs[0] / "manifest.json").read_text())["weights_sha256"] == manifest["weights_sha256"]


def test_missing_data_is_one_line_exit_1(tmp_path):
    r = cli_here("run", "--stage", "classifier", "--config", "configs/fmnist.yaml", "--store", str(tmp_path / "s"),
            "--set", f"data.data_dir={tmp_path / 'nothing'}")
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].startswith("error: fmnist: IDX file not found at")
