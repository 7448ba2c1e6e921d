"""Issue 15's probes, as a careful user would run them from outside: bad inputs give one line and the documented
exit code (2 configuration, 1 data/store) and write nothing; a corrupt output is reported by `pipeline verify`
and repaired with `--rebuild`; two runs on one output never both write; leftovers are reported and removed.
(Corruptions caught by the reading stage: test_precompute, test_evaluate_stage, test_purifier_stage; the
purifier's kill-and-resume: test_purifier_stage.)"""
import json
import os
import shutil

import numpy as np
import pytest

from pipeline import runner
from pipeline.config import load_config
from pipeline.store import output_lock
from tests.conftest import CLF, REPO, cli, cli_here, make_fmnist, write_idx



def sets(data_dir, *extra):
    return [a for s in [f"data.data_dir={data_dir}", *CLF, *extra] for a in ("--set", s)]


def one_line(r, code: int, *needles: str) -> None:
    """Exit ``code``; the error is one line (the last), every other line the project's own progress."""
    lines = r.stderr.strip().splitlines()
    assert r.returncode == code, r.stderr[-2000:]
    errors = [line for line in lines if not line.startswith("[")]
    assert len(errors) == 1 and lines[-1] == errors[0] and errors[0].startswith("error: "), r.stderr[-2000:]
    for n in needles:
        assert n in errors[0], errors[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The data folder of the tests that end before anything trains: written here, no classifier needed."""
    return make_fmnist(tmp_path_factory.mktemp("probes") / "fmnist", n_train=64, n_test=32)


@pytest.fixture(scope="module")
def trained(trained_classifier):
    """(data folder, store with the classifier trained once through the CLI, shared by the test run); tests
    corrupt copies."""
    return trained_classifier


def _copy(trained, tmp_path):
    store = tmp_path / "s"
    shutil.copytree(trained, store)
    return store


@pytest.mark.parametrize("command", ["run", "plan", "status"])
@pytest.mark.parametrize("setting,needle", [("activations.layers=[conv9]", "activations.layers: unknown layer(s) conv9"),
                                            ("purifier.layers=[conv9]", "purifier.layers: conv9 not among")])
def test_unknown_layer_names_exit_2_before_anything_runs(tmp_path, data, command, setting, needle):
    extra = ["--stage", "classifier"] if command == "run" else []
    r = cli_here(command, "--config", "configs/fmnist.yaml", "--store", str(tmp_path / "s"), *extra,
            *sets(data, setting))
    one_line(r, 2, needle)
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("stage,setting,needle", [
    ("attacks", "attack.n_examples=65", "attack.n_examples: 65 exceeds the 64 fmnist training images"),
    ("evaluate", "eval.n_examples=33", "eval.n_examples: 33 from eval.first_example=0: the fmnist test split has 32"),
    ("evaluate", "eval.first_example=32", "eval.first_example: 32: the fmnist test split has 32")])
def test_example_counts_beyond_the_split_exit_2_unclamped(tmp_path, data, stage, setting, needle):
    r = cli_here("run", "--config", "configs/fmnist.yaml", "--store", str(tmp_path / "s"), "--stage", stage,
            *sets(data, setting))
    one_line(r, 2, needle)
    assert not (tmp_path / "s").exists()


def test_binary_config_exit_2(tmp_path):
    bad = tmp_path / "model.yaml"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe")
    one_line(cli_here("plan", "--config", str(bad)), 2, str(bad), "not a text (UTF-8) YAML file")


def test_store_that_is_a_file_exit_1(tmp_path, data):
    f = tmp_path / "store"
    f.write_text("not a store")
    r = cli_here("run", "--config", "configs/fmnist.yaml", "--store", str(f), "--stage", "classifier", *sets(data))
    one_line(r, 1, f"--store {f}: exists and is not a directory")
    assert f.read_text() == "not a store"


def _malformed(tmp_path, defect: str):
    root = make_fmnist(tmp_path / "fmnist", n_train=64, n_test=32)
    if defect == "label":
        y = np.zeros(64, np.uint8)
        y[5] = 200
        write_idx(root / "train-labels-idx1-ubyte", y)
    else:
        write_idx(root / "train-images-idx3-ubyte", np.zeros((64, 32, 32), np.uint8))
    return root


@pytest.mark.parametrize("defect,needle", [("label", "label 200 outside the 10 fmnist classes"),
                                           ("shape", "images are 1x32x32, fmnist images are 1x28x28")])
def test_malformed_idx_data_is_one_error_naming_the_folder(tmp_path, defect, needle):
    from pipeline.data import DataError, load_split

    root = _malformed(tmp_path, defect)
    with pytest.raises(DataError) as e:
        load_split("fmnist", "train", str(root))
    assert needle in str(e.value) and str(root) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.slow
def test_malformed_idx_data_exit_1_from_inside_ray(tmp_path):
    """Read inside the classifier's Ray task: the console still gets one line naming the data directory (each
    defect's message: the test above)."""
    root = _malformed(tmp_path, "label")
    r = cli("run", "--config", "configs/fmnist.yaml", "--store", str(tmp_path / "s"), "--stage", "classifier",
            *sets(root))
    one_line(r, 1, "label 200 outside the 10 fmnist classes", str(root))
    assert not list((tmp_path / "s").glob("fmnist/classifier/*"))  # no empty key folder left behind


def test_a_second_run_on_a_locked_output_refuses_naming_the_holder(tmp_path, data):
    cfg = load_config(REPO / "configs/fmnist.yaml", [f"data.data_dir={data}", *CLF])
    ctx = runner.Context(cfg=cfg, store=runner.store_root(tmp_path / "s"), log=lambda m: None)
    out = ctx.output("classifier")
    with output_lock(out):
        r = cli_here("run", "--config", "configs/fmnist.yaml", "--store", str(tmp_path / "s"), "--stage", "classifier",
                *sets(data))
        one_line(r, 1, f"{out.dir}: being written by pid {os.getpid()}")
    assert not out.is_complete()


@pytest.mark.slow
def test_verify_finds_corruption_leftovers_and_rebuild_repairs_to_the_same_bytes(tmp_path, trained):
    """`verify` reports a corrupt file, a leftover temporary, an unlisted file and an empty key folder; `--fix`
    removes what is safe to remove; `--rebuild` trains the classifier again into the same folder. The rebuild runs
    under another run name and from a copy of the data in another folder, the two key-free fields
    (pipeline/spec.py): it lands in the same key folder and writes the same bytes as the run that trained it."""
    data, store = trained[0], _copy(trained[1], tmp_path)
    moved = tmp_path / "elsewhere"
    shutil.copytree(data, moved)
    args = ["--config", "configs/fmnist.yaml", "--store", str(store), *sets(moved, "name=renamed")]
    (out,) = (store / "fmnist" / "classifier").iterdir()
    model = out / "model.pt"
    good = model.read_bytes()
    blob = bytearray(good)
    blob[len(blob) // 2] ^= 0xFF
    model.write_bytes(bytes(blob))
    (out / ".model.pt.tmp-999999999-deadbeef").write_bytes(b"half a file")  # a killed writer's temporary
    (out / "notes.txt").write_text("mine")
    empty = store / "fmnist" / "attacks" / "0123456789abcdef"
    empty.mkdir(parents=True)

    r = cli_here("verify", "--store", str(store))
    assert r.returncode == 1
    assert f"{model}: content altered" in r.stderr
    assert "leftover temporary" in r.stderr and "notes.txt: not listed" in r.stderr
    assert f"{empty}: empty key folder" in r.stderr

    r = cli_here("verify", "--store", str(store), "--fix")
    assert r.returncode == 1 and "2 removed" in r.stdout  # the corrupt model and notes.txt stay
    assert not empty.exists() and not list(out.glob(".*.tmp-*")) and (out / "notes.txt").exists()

    r = cli("run", "--stage", "classifier", "--rebuild", *args)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"--rebuild: removing {out}" in r.stderr
    assert cli_here("verify", "--store", str(store)).returncode == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert {f["name"] for f in manifest["files"]} == {"metrics.json", "model.pt"}
    assert [p.name for p in (store / "fmnist" / "classifier").iterdir()] == [out.name] and model.read_bytes() == good


@pytest.mark.slow
def test_a_corrupt_manifest_is_never_a_cache_hit(tmp_path, trained):
    data, store = trained[0], _copy(trained[1], tmp_path)
    args = ["--config", "configs/fmnist.yaml", "--store", str(store), *sets(data)]
    (manifest,) = store.glob("fmnist/classifier/*/manifest.json")
    for bad in (b"", b"[1, 2]", b"\xff\xfe"):
        manifest.write_bytes(bad)
        one_line(cli_here("run", "--stage", "classifier", *args), 1, str(manifest), "corrupt manifest", "--rebuild")
    manifest.write_text('{"files": [{"name": "model.pt", "bytes": 1, "sha256": "0"}]}')
    one_line(cli_here("run", "--stage", "classifier", *args), 1, "model.pt: truncated or resized")
    assert not list(store.glob("fmnist/attacks/*")), "a stage ran on the corrupt classifier"
    # `--rebuild` repairs what a corrupt output blocks:
    # test_verify_finds_corruption_leftovers_and_rebuild_repairs_to_the_same_bytes


def test_a_corrupt_purifier_checkpoint_is_refused_before_it_is_read(tmp_path):
    """A resume reads the newest checkpoint only after checking it against the size and sha256 recorded when
    it was written."""
    import torch

    from pipeline.store import StoreError
    from stages.purifier import _store_checkpoint, latest_checkpoint, read_checkpoint

    _store_checkpoint(tmp_path, 0, {"epoch": 0, "model": {"w": torch.ones(3)}}, {"epoch": 1})
    path = latest_checkpoint(tmp_path)
    assert read_checkpoint(tmp_path, path)["epoch"] == 0
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(StoreError, match=f"{path}: content altered"):
        read_checkpoint(tmp_path, path)
