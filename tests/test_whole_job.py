"""The whole job through the CLI: `--stage evaluate` on an empty store (like make, every stage), `--stage all` as
cache hits, then a sweep that reuses every upstream output."""
import csv
import re
import shutil
from types import SimpleNamespace

import pytest

from tests.conftest import REPO, TOY_JOB, cli, cli_args, cli_here


PROJECT_LINE = re.compile(r"^\[(classifier|attacks|activations|purifier|evaluate|ray|pipeline|sweep)\] ")


@pytest.mark.slow
def test_the_job_then_cache_hits_then_sweep_reuses_upstream(toy, tmp_path):
    """The shared toy store was made by the CLI (tests/conftest.py ``_build_toy``): `--stage attacks --only` on an
    empty store (the CLI's code run by click in the test process, since it ends before Ray starts), then `--stage
    evaluate`, which like make runs every stage it needs: the whole job. Their consoles are read here; `--stage
    all` and a sweep then run on a copy of the store."""
    store = tmp_path / "store"
    shutil.copytree(toy.store, store)
    args = cli_args(store, toy.data, sets=TOY_JOB)
    only, r = (SimpleNamespace(**toy.runs[name]) for name in ("only", "job"))
    assert only.returncode == 1 and "classifier output" in only.stderr and "is not complete" in only.stderr
    assert len(only.stderr.strip().splitlines()) == 1  # and it wrote nothing: the job below ran the classifier
    assert r.returncode == 0, r.stderr[-3000:]
    assert ("[pipeline] --stage evaluate needs classifier, attacks, activations, purifier first" in r.stderr
            and "[classifier] running" in r.stderr and "cache hit" not in r.stderr)
    assert r.stderr.count("[classifier] epoch 1/1: adversarial loss") == 1  # the task's progress, printed once
    assert not list(store.glob("fmnist/classifier/*/.progress*"))
    assert "[evaluate] report: " in r.stderr
    # The console holds only the project's own lines, each once; Ray's output goes to the store's logs folder.
    lines = (r.stdout + r.stderr).strip().splitlines()
    foreign = [x for x in lines if not PROJECT_LINE.match(x)]
    assert not foreign, foreign[:5]
    epochs = [x for x in lines if x.startswith("[purifier] epoch ")]
    assert len(epochs) == len(set(epochs)) == 4
    assert "[ray] Ray's own logs" in r.stderr and list(store.glob("logs/session_*/*"))
    again = cli_here("run", "--stage", "all", *args)  # in this process: it fails if it starts Ray
    assert again.returncode == 0 and again.stderr.count("cache hit") == 5 and "[ray]" not in again.stderr

    s = cli("sweep", *args, "--grid", "eval.eps=0.05,0.1")
    assert s.returncode == 0, s.stderr[-3000:]
    for stage in ("classifier", "attacks", "activations", "purifier"):
        assert s.stderr.count(f"[{stage}] cache hit") == 2, stage  # nothing upstream recomputed
    assert s.stderr.count("[evaluate] cache hit") == 1 and s.stderr.count("[evaluate] running") == 1  # 0.1: the job's
    (comparison,) = list(store.glob("fmnist/sweeps/*/comparison.csv"))
    rows = list(csv.DictReader(comparison.open()))
    assert [r["eval.eps"] for r in rows] == ["0.05", "0.1"] and all(r["C/randAA"] for r in rows)
    for r in rows:  # the study columns: the gap to the classifier, its intervals, the diagnostics, the costs
        assert abs(float(r["C - AT (points)"]) - 100 * (float(r["C/randAA fresh mean"]) - float(r["AT/AA"]))) < 0.01
        assert r["C/randAA 95% CI"] and r["active units"].endswith("/64") and float(r["evaluate s"]) > 0
    md = (comparison.parent / "comparison.md").read_text()
    assert "REDUCED STRENGTH" in md and "robust_accuracy_vs_eps.png" in md
    (png,) = list(store.glob("fmnist/sweeps/*/robust_accuracy_vs_eps.png"))
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_sweep_grid_errors_are_config_errors(tmp_path):
    r = cli_here("sweep", "--config", "configs/fmnist.yaml", "--store", str(tmp_path), "--grid", "eval.aggregation=mean")
    assert r.returncode == 2 and "eval.aggregation" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = cli_here("sweep", "--config", "configs/fmnist.yaml", "--store", str(tmp_path))
    assert r.returncode == 2 and "--grid" in r.stderr


def test_grid_values_split_outside_brackets():
    from pipeline.sweep import parse_grid

    g = parse_grid(("purifier.layers=[conv1,conv2],[conv3]", "eval.samples=4,8"), None)
    assert g == {"purifier.layers": [["conv1", "conv2"], ["conv3"]], "eval.samples": [4, 8]}
    g = parse_grid((), str(REPO / "configs/ablations/fmnist.yaml"))
    assert g["eval.aggregation"] == ["robust", "logit", "prob"] and len(g["purifier.layers"]) == 2


@pytest.mark.parametrize("grid_file", sorted((REPO / "configs").glob("*/*.yaml")), ids=lambda p: p.name)
def test_shipped_grids_validate(grid_file):
    """Every shipped study / ablation grid gives valid configs for every combination, before anything runs."""
    from pipeline.sweep import combinations, parse_grid, validate

    grid = parse_grid((), str(grid_file))
    cfgs = validate(str(REPO / "configs/fmnist.yaml"), ("purifier.anneal_epochs=31",) if "volume" in grid_file.name
                    else (), grid)
    assert len(cfgs) == len(combinations(grid)) >= 1
