"""WebDataset tar shards of (perturbed) images: deterministic to write, pickle-free to read.

A sample is two tar members sharing the key ``<index:08d>_<kind>``:

- ``<key>.img.npy``: the image, float32 (C, H, W) in [0, 1], in ``.npy`` format (read with
  ``allow_pickle=False``). float32 keeps every stored image exactly inside its eps-ball; uint8 rounding
  would not.
- ``<key>.json``: ``{"index": source index in the split, "label": int, "kind": "clean" | "fgsm_half" | ...}``.

Shards are written with fixed tar metadata (mtime 0, fixed owner), so the same samples give the same bytes,
under a temporary name that is renamed when complete.
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import webdataset as wds

from .store import atomic_file


def encode_npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def decode_npy(blob: bytes, where: str) -> np.ndarray:
    try:
        return np.load(io.BytesIO(blob), allow_pickle=False)
    except ValueError as exc:
        raise ValueError(f"{where}: not a plain .npy array ({exc})") from None


def sample_key(index: int, kind: str) -> str:
    return f"{index:08d}_{kind}"


def write_shard(path: Path, samples: Iterable[tuple[int, int, str, np.ndarray]]) -> int:
    """Write ``(index, label, kind, image)`` samples to ``path`` atomically. Returns the sample count."""
    n = 0
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        with wds.TarWriter(f, user="carso", group="carso", mtime=0, encoder=False) as tw:
            for index, label, kind, img in samples:
                meta = json.dumps({"index": int(index), "label": int(label), "kind": kind}, sort_keys=True)
                tw.write({"__key__": sample_key(index, kind), "img.npy": encode_npy(img.astype(np.float32)),
                          "json": meta.encode()})
                n += 1
    return n


def read_shard(path: Path) -> Iterator[dict]:
    """Yield ``{"index", "label", "kind", "image"}`` dicts in shard order, via webdataset's tar reader."""
    # One explicit file: no node or worker splitting (callers assign shards to workers themselves).
    ds = wds.WebDataset(str(path), shardshuffle=False, empty_check=False, nodesplitter=None, workersplitter=None)
    for raw in ds:
        where = f"{path}:{raw['__key__']}"
        if "img.npy" not in raw or "json" not in raw:
            raise ValueError(f"{where}: sample lacks img.npy or json")
        meta = json.loads(raw["json"])
        yield {**meta, "image": decode_npy(raw["img.npy"], where)}


def read_shard_arrays(path: Path) -> dict[str, np.ndarray]:
    """The whole shard as stacked arrays: image (N,C,H,W) float32, label, index (int64), kind (str)."""
    rows = list(read_shard(path))
    return {"image": np.stack([r["image"] for r in rows]) if rows else np.zeros((0,), np.float32),
            "label": np.array([r["label"] for r in rows], dtype=np.int64),
            "index": np.array([r["index"] for r in rows], dtype=np.int64),
            "kind": np.array([r["kind"] for r in rows])}
