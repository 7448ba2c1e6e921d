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
