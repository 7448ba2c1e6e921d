"""`pipeline plan` and storage_layout.md's size table come from the same arithmetic."""
import re
import subprocess
import sys

import pytest

from pipeline.config import load_config
from pipeline.sizing import estimate
from tests.conftest import REPO

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
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "plan", "--config", "configs/cifar10.yaml", "--store",
                        str(tmp_path)], capture_output=True, text=True, cwd=REPO)
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
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "plan", "--config", "configs/cifar10.yaml", "--store",
                        str(tmp_path), "--tflops", "10", "--devices", "8"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("FLOPs:") == 6 and "at 10 TFLOP/s sustained x 8 device(s)" in r.stdout
    assert "paper (Table 1): 159 min on 8 A100" in r.stdout
