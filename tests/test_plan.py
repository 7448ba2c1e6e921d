"""`pipeline plan` and storage_layout.md's size table come from the same arithmetic."""
import re
import subprocess
import sys

import pytest

from pipeline.config import load_config
from pipeline.sizing import estimate
from tests.conftest import REPO, cli_here

ROWS = {"fmnist": "`fmnist.yaml`", "cifar10": "`cifar10.yaml`", "cifar100": "`cifar100.yaml`",
        "tinyimagenet": "`tinyimagenet.yaml`"}


def _table_row(name):
    text = (REPO / "storage_layout.md").read_text()
    (line,) = [l for l in text.splitlines() if l.startswith(f"| {ROWS[name]}")]
    cells = [c.strip() for c in line.strip("|").split("|")]
    num = lambda c: int(re.match(r"[\d,]+", c).group(0).replace(",", ""))  # noqa: E731
    return {"examples": num(cells[1]), "attack_sample_bytes": num(cells[2]), "attack_bytes_per_example": num(cells[3]),
            "attack_total_bytes": num(cells[4]), "layers": num(cells[5]), "activation_values_per_row": num(cells[6]),
            "activation_bytes_per_example": num(cells[7]), "activation_total_bytes_raw": num(cells[8])}


@pytest.mark.parametrize("name", list(ROWS))
def test_storage_layout_table_matches_sizing(name):
    e = estimate(load_config(REPO / f"configs/{name}.yaml"))
    assert _table_row(name) == {k: e[k] for k in _table_row(name)}


def test_plan_cifar10_prints_the_table_totals(tmp_path):
    r = cli_here("plan", "--config", "configs/cifar10.yaml", "--store", str(tmp_path))
    assert r.returncode == 0, r.stderr
    row = _table_row("cifar10")
    assert f"{row['attack_total_bytes']:,} B" in r.stdout and f"{row['activation_total_bytes_raw']:,} B raw" in r.stdout
    assert "classifier [missing]" in r.stdout and "attacks [waiting for upstream]" in r.stdout
    assert not any(tmp_path.iterdir())  # plan writes nothing


def test_flops_are_counted_on_the_real_modules():
    """The CNN's forward FLOPs equal the hand count of its convolutions and linear layers (2 per MAC); a training
    step costs about 3 forwards; the plan multiplies by the work."""
    from pipeline.flops import per_example, stage_flops
    from pipeline.plan import _counts

    cfg = load_config(REPO / "configs/fmnist.yaml")
    conv = lambda ci, co, hw: 2 * ci * co * 9 * hw * hw  # noqa: E731
    hand = conv(1, 16, 28) + conv(16, 32, 14) + conv(32, 64, 7) + 2 * 64 * 49 * 128 + 2 * 128 * 10
    f = per_example(cfg)
    assert f["classifier_forward"] == hand
    assert 2.5 * hand <= f["classifier_train_step"] <= 3.0 * hand
    # CARSO's input gradient: 8 reconstructions through the classifier and the decoder, forward and backward
    assert f["carso_input_grad"] > 8 * 2 * hand
    n = _counts(cfg)
    total = stage_flops(cfg, n)
    assert total["activations"] == n["samples"] * hand
    assert total["attacks"] == n["examples"] * (2 + 2 * cfg.attack.pgd_steps) * f["classifier_input_grad"]


def test_plan_prints_flops_hours_and_the_paper_table_1(tmp_path):
    r = cli_here("plan", "--config", "configs/cifar10.yaml", "--store", str(tmp_path), "--tflops", "10", "--devices", "8")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("FLOPs:") == 6 and "at 10 TFLOP/s sustained x 8 device(s)" in r.stdout
    assert "paper (Table 1): 159 min on 8 A100" in r.stdout


CAL_STAGES = ("classifier", "attacks", "activations", "purifier", "evaluate", "probes")


def _calibrated_rows(stdout):
    """Per stage: (FLOPs, projected seconds, GFLOP/s of the stage, GFLOP/s per worker, workers, the units' GFLOP/s)
    as `pipeline plan --calibrate` prints them."""
    rows, stage = {}, None
    for line in stdout.splitlines():
        if m := re.match(r"- (\w+) \[", line):
            stage = m.group(1)
        elif m := re.match(r"\s+FLOPs:\s+(\S+) -> (\S+) (h|s) \(calibrated\)$", line):
            seconds = float(m.group(2)) * (3600 if m.group(3) == "h" else 1)
            rows[stage] = {"flops": float(m.group(1)), "seconds": seconds}
        elif m := re.match(r"\s+rate:\s+(\S+) GFLOP/s = (\S+) GFLOP/s per worker x (\d+) worker\(s\) \((cpu|cuda), "
                           r".*?\); measured per worker: (.*)$", line):
            units = {u.split(":")[0]: float(re.search(r" (\S+) GFLOP/s", u).group(1)) for u in m.group(5).split("; ")}
            startup = sum(float(v) for v in re.findall(r"started in (\S+) s\)", m.group(5)))
            rows[stage] |= {"rate": float(m.group(1)) * 1e9, "per_worker": float(m.group(2)) * 1e9,
                            "workers": int(m.group(3)), "units": units, "startup_s": startup,
                            "measured": m.group(5)}
    return rows


@pytest.mark.slow
def test_plan_calibrate_projects_every_stage_from_the_measured_rates(tmp_path):
    """`pipeline plan --calibrate` on the default config: every stage's hours are its FLOPs / the rate it measured
    here (the stage's workers x one worker's rate), the rates printed, and --tflops nowhere."""
    from pipeline.flops import stage_flops, stage_parts
    from pipeline.plan import work_counts

    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "plan", "--config", "configs/fmnist.yaml", "--store",
                        str(tmp_path), "--calibrate", "--calibrate-seconds", "0.05"], capture_output=True, text=True,
                       cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert "hours CALIBRATED on this machine" in r.stdout and "each stage's unit of work timed for 0.05 s" in r.stdout
    assert "TFLOP/s sustained" not in r.stdout and "paper (Table 1)" not in r.stdout
    rows = _calibrated_rows(r.stdout)
    assert set(rows) == set(CAL_STAGES), r.stdout
    cfg = load_config(REPO / "configs/fmnist.yaml")
    work = work_counts(cfg)
    flops, parts = stage_flops(cfg, work), stage_parts(cfg, work)
    for stage, row in rows.items():
        assert row["flops"] == pytest.approx(flops[stage], rel=5e-3), stage
        assert row["rate"] > 0 and row["seconds"] > 0, stage
        # the projection is FLOPs / measured rate, and the rate is one worker's times the stage's workers
        assert row["seconds"] == pytest.approx(row["flops"] / row["rate"], rel=1e-2), stage
        assert row["rate"] == pytest.approx(row["per_worker"] * row["workers"], rel=1e-3), stage
        # one worker's rate is the FLOP-weighted harmonic mean of its units' measured rates (the purifier's with
        # the start-up of its spawned workers added to its seconds)
        worker_s = sum(parts[stage][p] / (row["units"][p] * 1e9) for p in parts[stage] if parts[stage][p])
        worker_s += row["startup_s"] * row["workers"]
        assert row["per_worker"] == pytest.approx(flops[stage] / worker_s, rel=5e-3), stage
    assert rows["purifier"]["workers"] == cfg.purifier.workers == 2 and rows["classifier"]["workers"] == 1
    # the purifier's step timed as the stage runs it: its 2 workers at once, DDP over gloo, started as processes
    assert "2 processes at once, DDP over gloo, 1 thread(s) each" in rows["purifier"]["measured"]
    assert rows["purifier"]["startup_s"] > 0 and all(rows[s]["startup_s"] == 0 for s in CAL_STAGES if s != "purifier")
    assert set(rows["classifier"]["units"]) == {"train", "test"}
    assert set(rows["evaluate"]["units"]) == {"carso", "classifier_aa"}
    total = re.search(r"total compute: \S+ FLOPs -> (\S+) (h|s) calibrated", r.stdout)
    assert total, r.stdout
    main = sum(rows[s]["seconds"] for s in CAL_STAGES if s != "probes")
    assert float(total.group(1)) * (3600 if total.group(2) == "h" else 1) == pytest.approx(main, rel=2e-2)
    assert not any(tmp_path.iterdir())  # plan writes nothing


def test_the_evaluations_work_counts_what_autoattacks_runner_attacks():
    """Before the classifier is trained the evaluation's FLOPs count every attack on every point; with the
    classifier's accuracies, AutoAttack's runner attacks only the points still right: APGD-CE the clean-right ones,
    APGD-DLR (standard AA's APGD-T, FAB-T and Square) the robust ones, the eps-0.95 check's APGD-DLR at chance.
    PGD+EOT attacks every point either way."""
    from pipeline.evaluation import Attacked
    from pipeline.flops import AA_STANDARD_FORWARDS, per_example, stage_parts
    from pipeline.plan import work_counts

    cfg = load_config(REPO / "configs/fmnist.yaml")
    ev, f = cfg.eval, per_example(cfg)
    aa, pgd = ev.aa_steps * ev.aa_eot, ev.pgd_eot_steps * ev.pgd_eot_iters
    upper = work_counts(cfg)
    assert upper["carso_passes"] == upper["carso_passes_max"] == 4 * aa + pgd
    a = Attacked(clean=0.8, robust=0.6, chance=0.1)
    exp = work_counts(cfg, a)
    assert exp["carso_passes"] == pytest.approx(aa * (0.8 + 0.6) + aa * (0.8 + 0.1) + pgd)
    assert exp["carso_passes_max"] == upper["carso_passes_max"]
    n = exp["n_eval"]
    clf_aa = stage_parts(cfg, exp, f)["evaluate"]["classifier_aa"]
    assert clf_aa == pytest.approx(n * ((100 * 0.8 + 1800 * 0.6) * f["classifier_input_grad"]
                                        + AA_STANDARD_FORWARDS * 0.6 * f["classifier_forward"]))
    assert clf_aa < stage_parts(cfg, upper, f)["evaluate"]["classifier_aa"]


@pytest.mark.slow
def test_plan_takes_the_attacked_fractions_from_the_trained_classifiers_metrics(tmp_path, trained_classifier):
    """The shared trained classifier's metrics.json gives the fractions; without it, the plan says upper bound."""
    import json

    from tests.conftest import CLF, cli_args

    data, store = trained_classifier
    args = cli_args(store, data, sets=CLF)
    r = cli_here("plan", *args)
    assert r.returncode == 0, r.stderr
    (metrics,) = store.glob("fmnist/classifier/*/metrics.json")
    m = json.loads(metrics.read_text())
    assert (f"the classifier's clean {100 * m['clean_acc']:.1f}% (APGD-CE), PGD {100 * m['pgd_acc']:.1f}% "
            "(APGD-DLR, standard AA's APGD-T, FAB-T, Square) and chance 10%") in r.stdout
    fresh = cli_here("plan", *cli_args(tmp_path / "empty", data, sets=CLF))
    assert "FLOPs for every attack on every point (an upper bound until the classifier is trained)" in fresh.stdout
    flops = [float(re.search(r"- evaluate .*\n.*\n\s+FLOPs:\s+(\S+)", out).group(1)) for out in (r.stdout, fresh.stdout)]
    assert flops[0] < flops[1]


@pytest.mark.parametrize("args, says", [
    (["--calibrate", "--calibrate-seconds", "-1"], "--calibrate-seconds -1.0: must be a number of seconds above 0"),
    (["--calibrate-seconds", "1"], "--calibrate-seconds: only with --calibrate"),
    (["--calibrate", "--tflops", "10"], "--tflops: not with --calibrate"),
])
def test_plan_calibrate_bad_values_are_one_line_and_exit_2(tmp_path, args, says):
    r = cli_here("plan", "--config", "configs/fmnist.yaml", "--store", str(tmp_path), *args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and r.stderr.startswith(f"error: {says}"), r.stderr
    assert r.stdout == ""


@pytest.mark.parametrize("seconds", [0, -1, float("nan"), float("inf"), 601])
def test_calibrate_seconds_out_of_range_is_an_option_error(seconds):
    from pipeline.calibrate import check_seconds
    from pipeline.errors import OptionError

    with pytest.raises(OptionError, match="must be a number of seconds above 0 and at most 600"):
        check_seconds(seconds)
