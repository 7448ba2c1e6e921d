"""The purifier's checkpoint write, two ways, alternating in one run: ``torch.save`` into a ``BytesIO``, the bytes
written atomically, then the file read again for its receipt's sha256 (the code before ``atomic_torch_save``), against
``pipeline.store.atomic_torch_save`` (streamed to the file and hashed on the way). The state is a purifier of
``--config`` with its RAdam + Lookahead state after one step, as ``stages/purifier.py`` checkpoints it (random
weights; the bytes do not depend on them). Prints JSON: seconds per write of each way, the speed-up, the file size.

    .venv/bin/python bench/checkpoint_write.py --config configs/cifar10.yaml --dir /tmp/ckb --rounds 3
"""
from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import load_config  # noqa: E402
from pipeline.models import build_classifier  # noqa: E402
from pipeline.models.purifier import PurifierSpec  # noqa: E402
from pipeline.purifier_train import build_optimizer, slow_state_dict  # noqa: E402
from pipeline.sizing import layer_shapes  # noqa: E402
from pipeline.store import atomic_torch_save, atomic_write_bytes, file_record  # noqa: E402


def checkpoint_state(cfg) -> dict:
    clf = build_classifier(cfg.classifier.arch, cfg.data.dataset, cfg.classifier.activation)
    layers = list(cfg.purifier.layers or cfg.activations.layers or clf.default_layers())
    shapes = layer_shapes(cfg.classifier.arch, cfg.data.dataset, cfg.classifier.activation, layers)
    model = PurifierSpec.for_config(cfg, shapes, layers).build()
    opt = build_optimizer(model, cfg.purifier)
    for q in model.parameters():
        q.grad = torch.zeros_like(q)
    opt.step()
    return {"model": model.state_dict(), "slow_model": slow_state_dict(model, opt), "optimizer": opt.state_dict(),
            "epoch": 0, "history": [{"epoch": 1}]}


def before(path: Path, state: dict) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())
    file_record(path.parent, path)  # the receipt read the file again


def streamed(path: Path, state: dict) -> None:
    rec = atomic_torch_save(path, state)
    file_record(path.parent, path, rec["sha256"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/cifar10.yaml")
    ap.add_argument("--dir", required=True, help="a folder on the filesystem the store would use")
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    state = checkpoint_state(load_config(a.config))
    d = Path(a.dir)
    d.mkdir(parents=True, exist_ok=True)
    times: dict[str, list[float]] = {"bytesio_then_reread": [], "streamed": []}
    size = 0
    for _ in range(a.rounds):
        for name, fn in (("bytesio_then_reread", before), ("streamed", streamed)):
            path = d / f"{name}.pt"
            t0 = time.perf_counter()
            fn(path, state)
            times[name].append(round(time.perf_counter() - t0, 2))
            size = path.stat().st_size
            path.unlink()
    med = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps({"config": a.config, "file_bytes": size, "seconds": times, "median_s": med,
                      "speedup": round(med["bytesio_then_reread"] / med["streamed"], 2)}, indent=1))


if __name__ == "__main__":
    main()
