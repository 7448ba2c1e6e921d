"""Stage `activations`: hooked classifier activations of every stored sample, as Zarr arrays.

Row r of every array is sample r of the attack shards taken in order (shard 0's five samples per example,
then shard 1's, ...). One unit per attack shard; its rows are chunk-aligned (``activations.chunk_rows``
divides ``len(KINDS) * attack.shard_size``), so workers never share a chunk. Each shard is checked against the
attacks manifest (size, sha256) before it is read.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from pipeline import zarr_store
from pipeline.attacks import KINDS
from pipeline.cluster import prepare_worker
from pipeline.config import ActivationsConfig
from pipeline.context import Context, cached_layers, classifier_identity
from pipeline.data import info
from pipeline.models import build_classifier, classifier_payload
from pipeline.models.hooks import activation_rows, forward_with_activations
from pipeline.shards import read_shard_arrays
from pipeline.store import Output, atomic_write_json, file_record, require_intact

from . import _pool

LAYOUT_UNIT = "_layout"


# Code version of this stage, part of its store key (pipeline.context.Context.key): bump it whenever a change
# alters what the stage writes.
VERSION = 1
UPSTREAM = ("classifier", "attacks")


# The spec (pipeline/spec.py): the store layout's settings, the hooked layers resolved (null and the
# architecture's explicit default list are one spec), the attack shards and the classifier's weights (inputs).
READS = ("data.dataset", "activations.layers", "activations.dtype", "activations.chunk_rows", "activations.clevel",
         "activations.batch_size", "activations.precision")
RESOLVED = {"activations.layers": "layers"}


def inputs(ctx: Context) -> dict:
    return {"attacks": ctx.upstream("attacks").key, "weights_sha256": classifier_identity(ctx)["weights_sha256"],
            "layers": cached_layers(ctx)}


class ActivationWorker(_pool.UnitWorker):
    """Ray Data actor: holds the classifier; turns one attack shard into its rows of every Zarr array."""

    def __init__(self, model_box, out_dir: str, attacks_dir: str, layers: list[str], acts: ActivationsConfig,
                 device: str, threads: int):
        prepare_worker(threads)
        self.device = device
        self.model = _pool.unbox(model_box).build(device)
        self.out = Output(Path(out_dir), "activations", "")
        self.attacks = Output(Path(attacks_dir), "attacks", "")
        self.records = {r["name"]: r for r in self.attacks.manifest()["files"]}  # read once per actor
        self.layers, self.p = layers, acts

    def do_unit(self, u: dict) -> dict:
        unit, file, start_row, rows = str(u["unit"]), str(u["file"]), int(u["start_row"]), int(u["rows"])
        t0 = time.perf_counter()
        require_intact(self.attacks, self.records[file])
        data = read_shard_arrays(self.attacks.dir / file)
        if len(data["label"]) != rows:
            raise RuntimeError(f"{self.attacks.dir / file}: {len(data['label'])} samples, expected {rows}")
        acts = self.forward(data["image"])
        kind_ids = np.array([KINDS.index(k) for k in data["kind"]], dtype=np.uint8)
        zarr_store.write_rows(self.out.dir, start_row, {**acts, "label": data["label"], "kind": kind_ids,
                                                        "index": data["index"]})
        cr = self.p.chunk_rows
        lo, hi = start_row // cr, -(-(start_row + rows) // cr)
        files = [p for name in self.layers for p in zarr_store.chunk_files(self.out.dir, name, 4, lo, hi)]
        files += [p for name in zarr_store.META_ARRAYS for p in zarr_store.chunk_files(self.out.dir, name, 1, lo, hi)]
        return self.out.write_receipt(unit, files, rows=[start_row, start_row + rows],
                                      seconds=time.perf_counter() - t0)

    def forward(self, images: np.ndarray) -> dict[str, np.ndarray]:
        return activation_rows(self.model, images, self.layers, batch_size=self.p.batch_size, dtype=self.p.dtype,
                               precision=self.p.precision, device=self.device)


def _layer_shapes(ctx: Context, layers: list[str]) -> dict[str, tuple[int, ...]]:
    up = ctx.upstream("classifier").manifest()
    model = build_classifier(up["arch"], ctx.cfg.data.dataset, up["activation"]).eval()
    meta = info(ctx.cfg.data.dataset)
    with torch.no_grad():
        _, acts = forward_with_activations(model, torch.zeros(1, meta.channels, meta.size, meta.size), layers)
    return {name: tuple(a.shape[1:]) for name, a in zip(layers, acts)}


def run(ctx: Context, out: Output) -> None:
    cfg, a = ctx.cfg, ctx.cfg.activations
    t0 = time.perf_counter()
    attacks = ctx.upstream("attacks")
    am = attacks.manifest()
    layers = cached_layers(ctx)
    records = {r["name"]: r for r in am["files"]}
    units = [{"unit": u["unit"], "file": f"{u['unit']}.tar", "start_row": len(KINDS) * u["start"],
              "rows": len(KINDS) * (u["stop"] - u["start"]), "items": len(KINDS) * (u["stop"] - u["start"])} for u in am["units"]]
    n_rows = am["counts"]["samples"]
    shapes = _layer_shapes(ctx, layers)
    attrs = {"layers": layers, "kinds": list(KINDS), "dtype": a.dtype, "chunk_rows": a.chunk_rows, "n_rows": n_rows,
             "shapes": {k: list(v) for k, v in shapes.items()}}
    if LAYOUT_UNIT not in out.done_units():
        zarr_store.create(out.dir, n_rows=n_rows, shapes=shapes, dtype=a.dtype, chunk_rows=a.chunk_rows,
                          clevel=a.clevel, attrs=attrs)
        out.write_receipt(LAYOUT_UNIT, zarr_store.metadata_files(out.dir))
    done = out.done_units()
    todo = [u for u in units if u["unit"] not in done]
    per_row = sum(int(np.prod(s)) for s in shapes.values()) * np.dtype(a.dtype).itemsize
    ctx.log(f"[activations] {n_rows} rows x {len(layers)} layers ({per_row} bytes/row before compression)")
    ctx.ray()
    summary = _pool.run_units(
        ctx, out, stage="activations", worker_cls=ActivationWorker, units=todo, total_items=n_rows,
        done_items=sum(u["rows"] for u in units if u["unit"] in done), unit_name="rows",
        worker_kwargs={"model_box": _pool.ref_box(classifier_payload(ctx.upstream("classifier"), cfg.data.dataset)),
                       "out_dir": str(out.dir), "attacks_dir": str(attacks.dir), "layers": layers,
                       "acts": a})
    receipts = {r["unit"]: r for r in out.receipts()}
    missing = [u["unit"] for u in units if u["unit"] not in receipts]
    if missing:
        raise RuntimeError(f"[activations] units {missing[:3]} produced no receipt")
    files = [f for r in receipts.values() for f in r["files"]]
    atomic_write_json(out.dir / "layout.json", attrs)
    files.append(file_record(out.dir, out.dir / "layout.json"))
    out.finalize(inputs={"attacks": attacks.key,
                         "weights_sha256": am["inputs"]["classifier"]["weights_sha256"],
                         "shards": {u["file"]: records[u["file"]]["sha256"] for u in units}},
                 files=files, counts={"rows": n_rows, "layers": len(layers), "bytes_per_row_raw": per_row},
                 timings={"total_s": time.perf_counter() - t0, "this_run": summary}, extra={"zarr": attrs})
