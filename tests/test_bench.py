"""bench/gpu_check.sh on its CPU path: bench/efficiency.py on scenario (a)'s models at toy size, end to end."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

UNITS = {"attack", "purifier", "carso", "activations"}


@pytest.mark.slow
def test_gpu_check_on_cpu_reports_every_unit_against_the_measured_peaks():
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}  # the CPU path, even on a GPU machine
    proc = subprocess.run(["bash", "bench/gpu_check.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    head, brace, body = proc.stdout.partition("{")
    assert "no GPU found" in head
    report = json.loads(brace + body)

    assert report["machine"]["device"] == "cpu" and report["machine"]["torch_threads"] >= 1
    assert report["machine"]["cpu"] and report["machine"]["torch"]
    assert report["models"]["classifier"]["arch"] == "wrn-28-10"
    peaks = report["peaks"]
    assert "gemm_float32" in peaks
    for peak in peaks.values():
        assert peak["flops"] == 2 * peak["n"] ** 3
        for phase in (peak["before"], peak["after"]):
            assert 0 < phase["flop_per_s"] < math.inf
            assert math.isclose(phase["flop_per_s"], peak["flops"] / phase["seconds"], rel_tol=1e-12)
        assert peak["flop_per_s"] == max(peak["before"]["flop_per_s"], peak["after"]["flop_per_s"])

    assert set(report["units"]) == UNITS
    for name, unit in report["units"].items():
        assert "error" not in unit, (name, unit)
        assert unit["flops"] > 0 and unit["seconds"] > 0, name
        assert 0 < unit["flop_per_s"] < math.inf, name
        assert math.isclose(unit["flop_per_s"], unit["flops"] / unit["seconds"], rel_tol=1e-12), name
        assert set(unit["ratio"]) == set(peaks), name
        for peak_name, ratio in unit["ratio"].items():
            assert math.isclose(ratio, unit["flop_per_s"] / peaks[peak_name]["flop_per_s"], rel_tol=1e-12), name
