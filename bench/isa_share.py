"""How much of a slower CPU kind's slowdown its missing vector instructions could explain: the classifier's
adversarial training step (SmallCNN, PGD-7, batch 128, the default config's settings, 2 threads) timed with this
CPU's own kernels and with torch and oneDNN capped at AVX2 (``ATEN_CPU_CAPABILITY=avx2``,
``ONEDNN_MAX_CPU_ISA=AVX2``, what the slower CPU-B kind has), each in a fresh process, alternating. Prints JSON:
the steps per second of each and their ratio. Where the cap costs little, the slower kind is slower at
everything alike, and a CPU quota (``bench/slow_machine.sh``) is the model of it the test suite's budget is
checked on (bench/README.md, "The test suite's own time").

    .venv/bin/python bench/isa_share.py [--steps 20] [--rounds 3]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import time, torch
from pipeline.adv_train import adversarial_step
from pipeline.config import load_config
from pipeline.models import build_classifier
cfg = load_config("configs/fmnist.yaml")
t = cfg.classifier.train
torch.set_num_threads(2)
torch.manual_seed(0)
model = build_classifier(cfg.classifier.arch, cfg.data.dataset)
opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
x, y = torch.rand(t.batch_size, 1, 28, 28), torch.randint(0, 10, (t.batch_size,))
step = lambda: adversarial_step(model, opt, x, y, eps=cfg.attack.eps, pgd_steps=t.pgd_steps,
                                pgd_step_size=2.5 * cfg.attack.eps / t.pgd_steps)
for _ in range(3):
    step()
t0 = time.perf_counter()
for _ in range({steps}):
    step()
print({steps} / (time.perf_counter() - t0))
"""
CAPPED = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def rate(steps: int, capped: bool) -> float:
    env = {**os.environ, **(CAPPED if capped else {})}
    r = subprocess.run([sys.executable, "-c", CHILD.replace("{steps}", str(steps))], env=env, capture_output=True,
                       text=True, check=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return float(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    native, capped = [], []
    for _ in range(a.rounds):
        native.append(rate(a.steps, False))
        capped.append(rate(a.steps, True))
    n, c = statistics.median(native), statistics.median(capped)
    print(json.dumps({"work": "classifier adversarial step (SmallCNN, PGD-7, batch 128, 2 threads)",
                      "steps_per_s": {"native": [round(v, 3) for v in native], "avx2": [round(v, 3) for v in capped]},
                      "native_over_avx2": round(n / c, 3)}, indent=1))


if __name__ == "__main__":
    main()
