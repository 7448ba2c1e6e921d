"""Zarr (v3) arrays of hooked classifier activations, aligned row by row with the attack shards.

    acts.zarr/
        zarr.json                       group metadata: layers, kinds, dtype
        <layer name>/                   one array per hooked layer, (N, C, H, W), float16 by default,
                                        chunks (chunk_rows, C, H, W), Blosc(zstd, bitshuffle)
        label/ kind/ index/             (N,) int64 / uint8 (index into KINDS) / int64, same row chunks

Rows are written chunk-aligned by independent workers (no two workers touch a chunk). Readers open only the
arrays of the layers they ask for, and check each chunk file against the manifest's sha256 before use.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BloscShuffle

from .store import StoreError, require_intact

GROUP = "acts.zarr"
META_ARRAYS = {"label": "int64", "kind": "uint8", "index": "int64"}


def _codec(clevel: int):
    return BloscCodec(cname="zstd", clevel=clevel, shuffle=BloscShuffle.bitshuffle)


def create(root: Path, *, n_rows: int, shapes: dict[str, tuple[int, ...]], dtype: str, chunk_rows: int,
           clevel: int, attrs: dict) -> None:
    """Create the group and every array (metadata only; no chunk is written)."""
    _create_arrays(zarr.open_group(str(root / GROUP), mode="w", attributes=attrs), n_rows=n_rows, shapes=shapes,
                   dtype=dtype, chunk_rows=chunk_rows, clevel=clevel)


def _create_arrays(group, *, n_rows: int, shapes: dict[str, tuple[int, ...]], dtype: str, chunk_rows: int,
                   clevel: int) -> None:
    for name, shape in shapes.items():
        group.create_array(name, shape=(n_rows, *shape), chunks=(chunk_rows, *shape), dtype=dtype,
                           compressors=[_codec(clevel)], fill_value=0)
    for name, dt in META_ARRAYS.items():
        group.create_array(name, shape=(n_rows,), chunks=(chunk_rows,), dtype=dt, compressors=[_codec(clevel)],
                           fill_value=0)


def open_array(root: Path, name: str, mode: str = "r"):
    """Every chunk is written, also one equal to the fill value (all-zero labels or ReLU maps): receipts and
    manifests list every chunk file. zarr 3.1 ignores ``open_array(config=...)`` for this; the global config at
    open time is what the array keeps."""
    with zarr.config.set({"array.write_empty_chunks": True}):
        return zarr.open_array(str(root / GROUP / name), mode=mode)


def write_rows(root, start: int, arrays: dict[str, np.ndarray]) -> None:
    """Rows ``start...`` of each array under the folder ``root``."""
    for name, values in arrays.items():
        open_array(root, name, mode="r+")[start:start + len(values)] = values


def chunk_files(root: Path, name: str, ndim: int, chunk_lo: int, chunk_hi: int) -> list[Path]:
    """Paths of the chunk files of rows-chunks [chunk_lo, chunk_hi) (default v3 '/'-separated keys)."""
    tail = "/0" * (ndim - 1)
    return [root / GROUP / name / "c" / f"{c}{tail}" for c in range(chunk_lo, chunk_hi)]


def metadata_files(root: Path) -> list[Path]:
    return sorted((root / GROUP).rglob("zarr.json"))


class ActivationReader:
    """Read rows of selected layers (plus label/kind/index), verifying each chunk file once before use."""

    def __init__(self, out, layers: list[str] | None = None):
        self.out = out
        manifest = out.manifest()
        self.records = {r["name"]: r for r in manifest["files"]}
        attrs = manifest["zarr"]
        self.layers = list(attrs["layers"]) if layers is None else list(layers)
        unknown = [name for name in self.layers if name not in attrs["layers"]]
        if unknown:
            raise StoreError(f"{out.dir}: layer(s) {', '.join(unknown)} not cached here; cached layers: "
                             f"{', '.join(attrs['layers'])}")
        self.chunk_rows = attrs["chunk_rows"]
        self.n_rows = attrs["n_rows"]
        self.arrays = {name: open_array(out.dir, name) for name in self.layers + list(META_ARRAYS)}
        self._verified: set[str] = set()

    def _verify(self, name: str, lo: int, hi: int) -> None:
        arr = self.arrays[name]
        for p in chunk_files(self.out.dir, name, arr.ndim, lo // self.chunk_rows, -(-hi // self.chunk_rows)):
            key = str(p.relative_to(self.out.dir))
            if key in self._verified:
                continue
            rec = self.records.get(key)
            if rec is None:
                raise StoreError(f"{p}: chunk not listed in the manifest")
            require_intact(self.out, rec)
            self._verified.add(key)

    def read(self, lo: int, hi: int) -> dict[str, np.ndarray]:
        out = {}
        for name, arr in self.arrays.items():
            self._verify(name, lo, hi)
            out[name] = arr[lo:hi]
        return out
