"""The comparison figure `pipeline sweep` writes beside comparison.md (and docs/make_figures.py draws for the README):
AT/AA and C/randAA per row with their 95% intervals, and a title that names the attack strength. No Ray."""
import json
import subprocess
import sys
from pathlib import Path

from pipeline.report import wilson
from pipeline.sweep import comparison_figure, figure_rows, figure_title

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _sweep_rows(reduced: bool, steps: int, eot: int) -> list[dict]:
    """Two rows as run_sweep collects them (the keys figure_rows and figure_title read)."""
    rows = []
    for layers, at, c in ((["conv1", "conv2", "conv3"], 0.67, 0.142), (["conv3"], 0.67, 0.54)):
        rows.append({"combo": {"purifier.layers": layers}, "summary": {"AT/AA": at, "C/randAA fresh mean": c},
                     "intervals_95": {"AT/AA": wilson(at, 200), "C/randAA fresh mean": wilson(c, 200)},
                     "reduced_strength": reduced, "eps": 0.1, "randaa_settings": {"steps": steps, "eot": eot}})
    return rows


def test_comparison_figure_writes_a_png_from_two_rows(tmp_path):
    rows = figure_rows({"purifier.layers": None}, _sweep_rows(True, 20, 4))
    assert [r["label"] for r in rows] == ['purifier.layers=["conv1", "conv2", "conv3"]', 'purifier.layers=["conv3"]']
    assert rows[1]["C/randAA"] == 0.54 and rows[1]["C/randAA 95% CI"] == wilson(0.54, 200)
    png = tmp_path / "comparison.png"
    comparison_figure(rows, png, figure_title("fmnist sweep", _sweep_rows(True, 20, 4)))
    data = png.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 10_000  # a drawn figure, not an empty canvas
    assert [p.name for p in tmp_path.iterdir()] == ["comparison.png"]  # written atomically: no temporary left


def test_figure_title_names_the_attack_strength():
    reduced = figure_title("fmnist sweep", _sweep_rows(True, 20, 4))
    assert "REDUCED STRENGTH" in reduced and "randAA 20 steps x EOT 4" in reduced and "eps 0.1" in reduced
    full = figure_title("fmnist sweep", _sweep_rows(False, 100, 20))
    assert "REDUCED" not in full and "full strength" in full and "randAA 100 steps x EOT 20" in full


def test_make_figures_draws_the_readme_figure_from_the_committed_numbers(tmp_path):
    src = REPO / "docs" / "results" / "headline.json"
    out = tmp_path / "headline.png"
    r = subprocess.run([sys.executable, str(REPO / "docs" / "make_figures.py"), str(src), str(out)],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes()[:8] == PNG_MAGIC and out.stat().st_size > 10_000
    data = json.loads(src.read_text())
    assert "FULL STRENGTH" in data["title"] and "100 steps x EOT 20" in data["title"]
    for row in data["rows"]:  # the committed intervals are the Wilson intervals of the committed numbers
        for key in ("AT/AA", "C/randAA"):
            lo, hi = wilson(row[key], row["points"])
            assert abs(lo - row[f"{key} 95% CI"][0]) < 6e-4 and abs(hi - row[f"{key} 95% CI"][1]) < 6e-4, (row, key)
        assert abs(100 * (row["C/randAA"] - row["AT/AA"]) - row["C - AT (points)"]) < 0.05


def _fake_results(c: float, reduced: bool = True) -> dict:
    """An evaluate stage's results.json with the keys run_sweep reads."""
    summary = {"AT/Cl": 0.8, "C/Cl": 0.72, "AT/AA": 0.67, "C/randAA": c - 0.01, "C/randAA fresh mean": c,
               "C/randAA fresh worst": c - 0.02, "PGD+EOT fresh mean": 0.6}
    return {"summary": summary, "reduced_strength": reduced, "points": 200, "eps": 0.1,
            "intervals_95": {k: wilson(summary[k], 200) for k in ("AT/Cl", "C/Cl", "AT/AA", "C/randAA",
                                                                  "C/randAA fresh mean")},
            "carso_randaa": {"settings": {"steps": 20, "eot": 4}}, "carso_minus_classifier": c - 0.67,
            "diagnostics": {"purification": {"classifier": 0.69, "carso": {"mean": 0.63}},
                            "stochasticity": {"disagreement_share": 0.09, "mean_pixel_std": 0.0096},
                            "training": {"final_kl": 0.5, "active_units": 11, "latent_dims": 64}}}


def test_run_sweep_writes_comparison_png_beside_comparison_md(tmp_path, monkeypatch):
    """The sweep's own writing path, with the stage graph replaced by outputs written here (no Ray)."""
    from pipeline import runner, sweep

    class Out:
        def __init__(self, stage, d):
            self.stage, self.dir, self.key = stage, d, f"key-{stage}-{d.name}"

        def manifest(self):
            return {"timings": {"total_s": 1.0}}

    def fake_run(ctx, stage):
        assert stage == "all"
        agg = ctx.cfg.eval.aggregation
        d = tmp_path / "outs" / agg
        d.mkdir(parents=True, exist_ok=True)
        (d / "results.json").write_text(json.dumps(_fake_results(0.54 if agg == "robust" else 0.28)))
        return [Out(s, d) for s in ("classifier", "attacks", "activations", "purifier", "evaluate")]

    monkeypatch.setattr(sweep.runner, "run", fake_run)
    out = sweep.run_sweep(str(REPO / "configs" / "fmnist.yaml"), (), {"eval.aggregation": ["robust", "logit"]},
                          runner.store_root(tmp_path / "store"), log=lambda m: None)
    md, png = out / "comparison.md", out / "comparison.png"
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 10_000
    assert "](comparison.png)" in md.read_text() and "REDUCED STRENGTH" in md.read_text()
    runs = json.loads((out / "sweep.json").read_text())["runs"]
    assert [r["intervals_95"]["C/randAA fresh mean"] for r in runs] == [list(wilson(0.54, 200)), list(wilson(0.28, 200))]
    assert not (out / "robust_accuracy_vs_eps.png").exists()  # that figure is for sweeps over eval.eps alone
