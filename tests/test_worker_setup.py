"""pipeline.cluster.prepare_worker: what every stage's compute process does first (threads, glibc malloc)."""
from __future__ import annotations

import ctypes.util
import json
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import REPO

# One process per side: malloc's thresholds are process-wide and cannot be un-pinned. The process never loads data
# from files, as a Ray worker that receives its data deserialised does not: its allocation history is the training's.
TRAIN = textwrap.dedent("""
    import json, resource, sys, torch
    from pipeline.adv_train import adversarial_train
    from pipeline.cluster import prepare_worker
    from pipeline.models import build_classifier, state_dict_hash
    if sys.argv[1] == "pinned":
        prepare_worker(1)
    else:
        torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (512, 1, 28, 28), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (512,), generator=g)
    torch.manual_seed(0)
    model = build_classifier("cnn", "fmnist")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    adversarial_train(model, x, y, epochs=1, batch_size=128, lr=0.01, momentum=0.9, weight_decay=5e-4, eps=0.1,
                      pgd_steps=7, pgd_step_size=0.025, seed=0, log=lambda line: None)
    print(json.dumps({"faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before,
                      "threads": torch.get_num_threads(), "sha": state_dict_hash(model)}))
""")


def _train(side: str) -> dict:
    out = subprocess.run([sys.executable, "-c", TRAIN, side], cwd=REPO, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux" or ctypes.util.find_library("c") is None, reason="glibc malloc only")
def test_pinned_malloc_thresholds_stop_the_page_fault_storm_and_change_no_number():
    pinned, default = _train("pinned"), _train("default")
    assert pinned["threads"] == default["threads"] == 1
    assert pinned["sha"] == default["sha"]  # only where the memory comes from differs
    # Measured: about 200,000 minor faults with glibc's starting thresholds, about 30,000 pinned (most of them the
    # first touch of memory that then stays mapped).
    assert pinned["faults"] * 3 < default["faults"], (pinned, default)
