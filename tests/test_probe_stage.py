"""The probes stage on a real local Ray instance and real Zarr activations, at toy size: one row per hooked layer
with both probe kinds and the three scores, keyed like the other stages, and its bad inputs as one-line errors."""
import json
from functools import partial

import pytest

from pipeline import runner
from tests import conftest
from tests.conftest import TOY_SETS, TOY_TEST, TOY_TRAIN, cli_args, cli_here, toy_store

SETS = [*TOY_SETS, "probes.first_example=0", "probes.n_examples=16", "probes.pgd_steps=3", "probes.epochs=2",
        "probes.robust_examples=64", "probes.robust_epochs=1", "probes.robust_pgd_steps=2", "probes.batch_size=32"]
make_ctx = partial(conftest.make_ctx, sets=SETS)


@pytest.fixture(scope="module")
def data_dir(toy):
    return toy.data


@pytest.fixture(scope="module")
def store(tmp_path_factory, toy, data_dir):
    """The shared toy store's classifier, shards and activations, and the probes run on them."""
    with toy_store(tmp_path_factory, toy, ignore=("logs", "purifier", "evaluate", "baseline")) as root:
        runner.run(make_ctx(root, data_dir), "probes")
        yield root


@pytest.mark.slow
def test_one_row_per_layer_with_both_probe_kinds(store, data_dir):
    ctx = make_ctx(store, data_dir)
    out = ctx.output("probes")
    assert out.is_complete()
    r = json.loads((out.dir / "probes.json").read_text())
    assert [row["layer"] for row in r["layers"]] == ["conv1", "conv2", "conv3"]
    for row in r["layers"]:
        for kind in ("transfer_probe", "robust_probe"):
            scores = row[kind]
            assert set(scores) >= {"clean", "transfer", "adaptive", "n"} and scores["n"] == 16
            assert all(0 <= scores[k] <= 1 for k in ("clean", "transfer", "adaptive"))
        assert row["transfer_probe"]["train_rows"] == 5 * TOY_TRAIN and row["robust_probe"]["train_images"] == 64
        assert row["dim"] == {"conv1": 16 * 28 * 28, "conv2": 32 * 14 * 14, "conv3": 64 * 7 * 7}[row["layer"]]
    assert 0 <= r["classifier"]["pgd"] <= r["classifier"]["clean"] <= 1 and r["classifier"]["n"] == 16
    s = r["settings"]
    assert s["eps"] == 0.1 and s["scoring_attack"]["steps"] == 3 and s["points"] == [0, 16]
    report = (out.dir / "report.md").read_text()
    assert "| # | layer | shape | transfer probe: clean |" in report and "robust probe: adaptive" in report
    assert "`conv2`" in report and "PGD 3 steps of 0.01" in report
    assert (out.dir / "probes.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {f["name"] for f in out.manifest()["files"]} >= {"probes.json", "report.md", "probes.png",
                                                            "transfer_x.npy", "layers/00.json", "layers/02.pt"}


@pytest.mark.slow
def test_a_layer_gives_the_same_numbers_whichever_layers_are_probed(store, data_dir):
    """Seeds come from the layer's name: probing conv3 alone is another output (another key) with conv3's row."""
    whole = json.loads((make_ctx(store, data_dir).output("probes").dir / "probes.json").read_text())
    alone_ctx = make_ctx(store, data_dir, "probes.layers=[conv3]")
    assert alone_ctx.key("probes") != make_ctx(store, data_dir).key("probes")
    alone = json.loads((runner.run(alone_ctx, "probes")[0].dir / "probes.json").read_text())
    strip = lambda row: {k: v for k, v in row.items() if k not in ("index", "seconds")}  # noqa: E731
    assert [strip(row) for row in alone["layers"]] == [strip(whole["layers"][2])]
    assert alone["classifier"] == whole["classifier"]
    # Settings that change a number change the key; the explicit default eps shares it.
    assert make_ctx(store, data_dir, "probes.eps=0.1").key("probes") == make_ctx(store, data_dir).key("probes")
    assert make_ctx(store, data_dir, "probes.robust_epochs=2").key("probes") != make_ctx(store, data_dir).key("probes")


@pytest.mark.parametrize("setting,needle", [
    ("probes.layers=[conv9]", "probes.layers: conv9 not among the cached layers"),
    (f"probes.n_examples={TOY_TEST + 1}",
     f"probes.n_examples: {TOY_TEST + 1} from probes.first_example=0: the fmnist test split has {TOY_TEST}"),
    (f"probes.robust_examples={TOY_TRAIN + 1}",
     f"probes.robust_examples: {TOY_TRAIN + 1} exceeds the {TOY_TRAIN} fmnist training images")])
def test_bad_probe_settings_exit_2_in_one_line_before_any_stage(tmp_path, data_dir, setting, needle):
    r = cli_here("run", "--stage", "probes", *cli_args(tmp_path / "s", data_dir, setting, sets=SETS))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and lines[-1].startswith("error: ") and needle in lines[-1], r.stderr[-2000:]
    assert not any(line.startswith("[classifier]") for line in lines) and not (tmp_path / "s" / "fmnist").exists()


def test_only_names_the_missing_upstream_stage(tmp_path, data_dir):
    r = cli_here("run", "--stage", "probes", "--only", *cli_args(tmp_path / "s", data_dir, sets=SETS))
    errors = [line for line in r.stderr.strip().splitlines() if not line.startswith("[")]
    assert r.returncode == 1 and len(errors) == 1 and "run `--stage classifier` first" in errors[0], r.stderr


@pytest.mark.slow
def test_a_probe_sweep_tabulates_every_combination_and_layer(store, data_dir):
    # In this process, on the module's Ray (the store fixture's probes run started it): the CLI's own sweep
    # through a new interpreter is tests/test_whole_job.py's.
    r = cli_here("sweep", "--stage", "probes", "--grid", "probes.layers=[conv3],[conv1,conv2]",
            *cli_args(store, data_dir, sets=SETS))
    assert r.returncode == 0, r.stderr[-2000:]
    md = next((store / "fmnist" / "sweeps").glob("*/comparison.md")).read_text()
    rows = [line for line in md.splitlines() if line.startswith("| `") or line.startswith("| [")]
    assert len(rows) == 3 and "robust adaptive" in md and "PGD 3 x 0.01" in md, md
    whole = json.loads((make_ctx(store, data_dir).output("probes").dir / "probes.json").read_text())
    conv1 = whole["layers"][0]["robust_probe"]["adaptive"]
    assert any("| conv1 |" in line and f"{100 * conv1:.1f}%" in line for line in rows), md
