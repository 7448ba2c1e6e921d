"""The evaluate stage on a real local Ray instance, at reduced strength, on a small trained CARSO."""
import json
import shutil
from functools import partial

import pytest

from pipeline import runner
from pipeline.errors import find_user_error, one_line
from tests import conftest
from tests.conftest import TOY_SETS, toy_store

SETS = TOY_SETS
make_ctx = partial(conftest.make_ctx, sets=SETS)


@pytest.fixture(scope="module")
def data_dir(toy):
    return toy.data


@pytest.fixture(scope="module")
def store(tmp_path_factory, toy):
    """The shared toy store (its purifier is this module's)."""
    with toy_store(tmp_path_factory, toy) as root:
        yield root


def _chunks(out):
    res = {}
    for p in sorted((out.dir / "chunks").glob("chunk-*.json")):
        d = json.loads(p.read_text())
        d.pop("seconds")
        res[p.name] = d
    return res


@pytest.mark.slow
def test_two_workers_equal_one_worker_and_outputs(store, data_dir, toy):
    lines = []
    two = runner.run(make_ctx(store, data_dir, workers=2, log=lines.append), "evaluate")[0]
    # Progress inside a chunk: a line per finished part, each chunk's attacks in order; the file goes at the end.
    parts = [line.split(": ", 1)[1].split(" done, ")[0] for line in lines if line.startswith("[evaluate] chunk 1 (")]
    assert parts == ["the classifier's standard AutoAttack", "CARSO's clean draws and the diagnostics", "C/randAA",
                     "PGD+EOT", "obfuscation check (randAA at eps 0.95)"], lines
    assert any(line.startswith("[evaluate] chunk 2 (test points 8-11): C/randAA done, ") for line in lines), lines
    assert not (two.dir / "progress.log").exists()
    # The toy job's own evaluation (the CLI, one worker, points 0-3) is this run's first chunk, number for number:
    # chunks are seeded by their first point, so neither the worker count nor the points after them change them.
    one = make_ctx(store, data_dir, "eval.n_examples=4").output("evaluate")
    assert one.is_complete() and "on 1 worker(s)" in toy.runs["job"]["stderr"]
    assert _chunks(one) == {"chunk-0000.json": _chunks(two)["chunk-0000.json"]} and len(_chunks(two)) == 3
    r = json.loads((two.dir / "results.json").read_text())
    assert r["points"] == 12
    # Every number carries its settings; reduced strength is labelled in both files.
    assert r["reduced_strength"] and r["reduced_settings"]["aa_steps"] == {"used": 3, "paper": 100}
    assert r["carso_randaa"]["settings"]["steps"] == 3 and r["carso_randaa"]["settings"]["eot"] == 2
    # The classifier's standard AutoAttack stays at full strength whatever eval.aa_steps says (only CARSO's is
    # reduced here), and the report prints the settings the library ran with.
    aa = r["classifier_autoattack"]["settings"]
    assert aa["apgd_steps"] == 100 and aa["version"] == "standard" and aa["attacks"][0] == "apgd-ce"
    assert r["carso_pgd_eot"]["settings"]["eot"] == 2 and r["carso_randaa"]["fresh"]["draws"] == 2
    report = (two.dir / "report.md").read_text()
    assert "REDUCED STRENGTH" in report and "| AT/Cl | C/Cl | AT/AA | C/randAA | (PGD+EOT) |" in report
    assert (two.dir / "reconstructions.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Not flattering: robust <= clean-correct, fresh-draw worst case <= mean.
    assert r["carso_randaa"]["runner"] <= r["carso_clean"]["mean"] + 1e-9
    assert r["carso_randaa"]["fresh"]["per_point_worst"] <= r["carso_randaa"]["fresh"]["mean"] + 1e-9
    # The eps = 0.95 check drives accuracy to or below chance.
    ob = r["obfuscation_check"]
    assert ob["passed"] and ob["fresh"]["mean"] <= 0.1 and ob["settings"]["eps"] == 0.95
    # Diagnostics: purification, stochasticity, training; the gap to the classifier with its intervals.
    d = r["diagnostics"]
    assert d["purification"]["settings"]["steps"] == 40 and d["purification"]["settings"]["eps"] == 0.1
    assert 0 <= d["purification"]["classifier"] <= 1 and d["purification"]["carso"]["draws"] == 2
    assert 0 <= d["stochasticity"]["disagreement_share"] <= 1 and d["stochasticity"]["mean_pixel_std"] > 0
    pur = runner.run(make_ctx(store, data_dir), "purifier")[0].manifest()["final_metrics"]
    assert d["training"] == {"final_kl": pur["kl"], "active_units": pur["active_units"], "latent_dims": 64,
                             "active_threshold_nats": 0.01}
    assert abs(r["carso_minus_classifier"] - (r["summary"]["C/randAA fresh mean"] - r["summary"]["AT/AA"])) < 1e-12
    from pipeline.report import wilson

    assert r["intervals_95"]["AT/AA"] == list(wilson(r["summary"]["AT/AA"], 12))  # of the 12 points, not more
    assert f"APGD {aa['apgd_steps']} steps, {aa['apgd_t_targets']} target classes, Square {aa['square_queries']} queries" in report
    assert "## Diagnostics" in report and "C/randAA (fresh mean) - AT/AA" in report
    # The training line gives the measured numbers and no verdict that the numbers could contradict.
    assert f"{pur['active_units']} of 64 latent dimensions active" in report and "ignores z" not in report
    assert (two.dir / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    chunk = json.loads((two.dir / "chunks" / "chunk-0000.json").read_text())
    assert len(chunk["diagnostics"]["disagree"]) == len(chunk["diagnostics"]["pixel_std"]) == 4
    # Chunks are seeded by the absolute index of their first point: a run over points 4-11 (on one worker) repeats
    # the full run's chunks 1 and 2 exactly, whatever else it adds (the logit surrogate).
    shifted = runner.run(make_ctx(store, data_dir, "eval.first_example=4", "eval.n_examples=8",
                                  "eval.pgd_eot_logit_surrogate=true", workers=1), "evaluate")[0]
    for c in (0, 1):
        moved = json.loads((shifted.dir / "chunks" / f"chunk-{c:04d}.json").read_text())
        whole = json.loads((two.dir / "chunks" / f"chunk-{c + 1:04d}.json").read_text())
        assert moved["seed"] == whole["seed"] == 8 * 4 * (c + 1)
        # (The obfuscation check runs after the surrogate on the same random stream, so only it may differ.)
        same = {k: v for k, v in whole.items() if k not in ("seconds", "chunk", "range", "obfuscation")}
        assert {k: moved[k] for k in same} == same
    rs = json.loads((shifted.dir / "results.json").read_text())
    assert rs["first_example"] == 4 and rs["carso_pgd_eot_logit"]["settings"]["gradient_through"] == "logit aggregation"
    assert "PGD+EOT (logit surrogate) fresh mean" in rs["summary"]


@pytest.mark.slow
def test_an_interrupted_evaluation_resumes_to_the_same_result(store, data_dir, tmp_path):
    """The evaluation resumes from its chunk receipts, the one mechanism every stage's units use (a killed
    process leaving them is tested on the attacks stage, tests/test_precompute.py): a run that stopped after
    chunks 0 and 2 (chunk 1's receipt and record gone, no manifest, no results) computes chunk 1 alone and ends
    with the uninterrupted run's chunks and results."""
    ref = runner.run(make_ctx(store, data_dir), "evaluate")[0]  # the uninterrupted run (a cache hit after the first test)
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    out_dir = copy / ref.dir.relative_to(store)
    for name in ("manifest.json", "results.json", "report.md", "_units/chunk-0001.json", "chunks/chunk-0001.json"):
        (out_dir / name).unlink()
    logs = []
    out = runner.run(make_ctx(copy, data_dir, log=logs.append, workers=1), "evaluate")[0]
    assert out.dir == out_dir and any("resuming" in m and "2 unit(s) already finished" in m for m in logs), logs
    a = json.loads((out_dir / "results.json").read_text())
    b = json.loads((ref.dir / "results.json").read_text())
    assert a["summary"] == b["summary"] and a["chunk_seeds"] == b["chunk_seeds"] == [0, 32, 64]
    assert _chunks(ref) == _chunks(out)


def test_official_backend_missing_is_a_clear_error(store, data_dir):
    from pipeline.evaluation import EvalError

    try:
        import autoattack  # noqa: F401
        pytest.skip("the official autoattack package is installed here")
    except ImportError:
        pass
    ctx = make_ctx(store, data_dir, "eval.backend=autoattack")
    with pytest.raises(EvalError) as e:
        runner.run(ctx, "evaluate")
    msg = one_line(find_user_error(e.value))
    assert msg.startswith("eval.backend=autoattack: the official AutoAttack package is not importable")
    assert "\n" not in msg and not ctx.output("evaluate").is_complete()


@pytest.mark.slow
def test_a_corrupt_purifier_is_refused_before_use(store, data_dir, tmp_path):
    """One flipped byte in purifier.pt: a one-line error naming the file, nothing evaluated."""
    from pipeline.store import StoreError

    copy = tmp_path / "store"
    shutil.copytree(store, copy, ignore=shutil.ignore_patterns("evaluate", "baseline"))
    ctx = make_ctx(copy, data_dir)
    pt = ctx.upstream("purifier").dir / "purifier.pt"
    blob = bytearray(pt.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    pt.write_bytes(bytes(blob))
    with pytest.raises(StoreError) as e:
        runner.run(ctx, "evaluate")
    msg = one_line(find_user_error(e.value))
    assert str(pt) in msg and "sha256" in msg and "\n" not in msg
    assert not ctx.output("evaluate").is_complete() and not list(copy.glob("*/baseline/*"))


def test_more_points_than_the_split_is_an_error(store, data_dir):
    """Checked before anything runs (a configuration error, exit 2), never clamped."""
    from pipeline.config import ConfigError

    ctx = make_ctx(store, data_dir, "eval.first_example=60", "eval.n_examples=8")  # 64 test points
    with pytest.raises(ConfigError, match="eval.n_examples: 8 from eval.first_example=60: the fmnist test split has 64"):
        runner.run(ctx, "evaluate")
    assert not ctx.output("evaluate").dir.exists()
