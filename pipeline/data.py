"""Datasets as uint8 tensors (N, C, H, W) with int64 labels, read from their standard on-disk formats.

- Fashion-MNIST: the four IDX files (optionally gzipped), Debian package ``dataset-fashion-mnist``.
- CIFAR-10 / CIFAR-100: the "python version" archive or its extracted folder. Those files are pickles; they
  are read with an unpickler that admits only plain containers and numpy arrays, never arbitrary classes.
- TinyImageNet-200: the standard ``tiny-imagenet-200`` folder (train/<wnid>/images, val/images +
  val_annotations.txt). Its labelled ``val`` split is used as the test split.

Pixels stay uint8 here; ``to_float`` maps them into [0, 1], the space every eps in this project lives in.
"""
from __future__ import annotations

import gzip
import io
import pickle
import struct
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .errors import UserError


class DataError(UserError):
    """Missing or malformed dataset files. The message names the path and how to obtain the data."""


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    channels: int
    size: int
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    default_dir: str
    how_to_get: str
    train_size: int = 0
    test_size: int = 0


DATASETS = {
    "fmnist": DatasetInfo(
        "fmnist", 1, 28, 10, (0.2860,), (0.3530,), "/usr/share/datasets/fashion-mnist",
        "install Debian's package 'dataset-fashion-mnist' (apt-get install dataset-fashion-mnist) or download "
        "the four *-idx?-ubyte.gz files from https://github.com/zalandoresearch/fashion-mnist into data.data_dir",
        60000, 10000),
    "cifar10": DatasetInfo(
        "cifar10", 3, 32, 10, (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616), "./data",
        "download https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz into data.data_dir "
        "(the archive or its extracted cifar-10-batches-py folder)", 50000, 10000),
    "cifar100": DatasetInfo(
        "cifar100", 3, 32, 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), "./data",
        "download https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz into data.data_dir "
        "(the archive or its extracted cifar-100-python folder)", 50000, 10000),
    "tinyimagenet": DatasetInfo(
        "tinyimagenet", 3, 64, 200, (0.4802, 0.4481, 0.3975), (0.2770, 0.2691, 0.2821), "./data",
        "download http://cs231n.stanford.edu/tiny-imagenet-200.zip and extract it into data.data_dir "
        "(so that data_dir/tiny-imagenet-200/wnids.txt exists)", 100000, 10000),
}


def info(name: str) -> DatasetInfo:
    return DATASETS[name]


def to_float(x_uint8: torch.Tensor) -> torch.Tensor:
    return x_uint8.float().div_(255.0)


def load_split(dataset: str, split: str, data_dir: str | None = None, subset: int | None = None):
    """Return ``(images uint8 [N,C,H,W], labels int64 [N])`` for ``split`` in {'train', 'test'}."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    meta = DATASETS[dataset]
    root = Path(data_dir or meta.default_dir).expanduser()
    loader = {"fmnist": _load_fmnist, "cifar10": _load_cifar10, "cifar100": _load_cifar100,
              "tinyimagenet": _load_tinyimagenet}[dataset]
    x, y = loader(root, split, meta)
    check_arrays(x, y, meta, f"{root} ({split} split)")
    if subset is not None:
        x, y = x[:subset], y[:subset]
    return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y.astype(np.int64))


def check_arrays(x: np.ndarray, y: np.ndarray, meta: DatasetInfo, where: str) -> None:
    """Images of the dataset's shape and labels within its class count, or a DataError naming the files."""
    if tuple(x.shape[1:]) != (meta.channels, meta.size, meta.size):
        raise DataError(f"{where}: images are {'x'.join(map(str, x.shape[1:]))}, {meta.name} images are "
                        f"{meta.channels}x{meta.size}x{meta.size}")
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= meta.num_classes):
        bad = int(y.max()) if int(y.max()) >= meta.num_classes else int(y.min())
        raise DataError(f"{where}: label {bad} outside the {meta.num_classes} {meta.name} classes (0-"
                        f"{meta.num_classes - 1})")


def _missing(meta: DatasetInfo, path: Path, what: str) -> DataError:
    return DataError(f"{meta.name}: {what} not found at {path}: {meta.how_to_get}")


# --------------------------------------------------------------------------------------------------
# IDX (Fashion-MNIST)
# --------------------------------------------------------------------------------------------------
def _open_maybe_gz(root: Path, stem: str, meta: DatasetInfo) -> tuple[Path, bytes]:
    for name in (stem, stem + ".gz"):
        p = root / name
        if p.is_file():
            raw = p.read_bytes()
            if name.endswith(".gz"):
                try:
                    raw = gzip.decompress(raw)
                except (OSError, EOFError) as exc:
                    raise DataError(f"{meta.name}: {p} is not a valid gzip file ({exc}): {meta.how_to_get}") from None
            return p, raw
    raise _missing(meta, root / (stem + ".gz"), "IDX file")


def read_idx(path: Path, raw: bytes) -> np.ndarray:
    """Parse an IDX file (big-endian header: 0, 0, dtype code, ndim, then ndim uint32 sizes)."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path}: not an IDX file (bad magic number)")
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if raw[2] not in dtypes:
        raise DataError(f"{path}: unknown IDX dtype code {raw[2]:#x}")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise DataError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    dt = np.dtype(dtypes[raw[2]])
    expected = int(np.prod(shape)) * dt.itemsize
    body = raw[4 + 4 * ndim:]
    if len(body) != expected:
        raise DataError(f"{path}: IDX body has {len(body)} bytes, header says {expected} (truncated or corrupt)")
    return np.frombuffer(body, dtype=dt).reshape(shape).astype(dt.newbyteorder("="))


def _load_fmnist(root: Path, split: str, meta: DatasetInfo):
    prefix = "train" if split == "train" else "t10k"
    pi, raw_i = _open_maybe_gz(root, f"{prefix}-images-idx3-ubyte", meta)
    pl, raw_l = _open_maybe_gz(root, f"{prefix}-labels-idx1-ubyte", meta)
    x, y = read_idx(pi, raw_i), read_idx(pl, raw_l)
    if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
        raise DataError(f"{pi}: images {x.shape} and labels {y.shape} from {pl} do not match")
    return x[:, None, :, :].astype(np.uint8), y


# --------------------------------------------------------------------------------------------------
# CIFAR (python version)
# --------------------------------------------------------------------------------------------------
class _SafeUnpickler(pickle.Unpickler):
    """Admits numpy's array reconstruction and nothing else: a crafted file cannot run code."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def safe_unpickle(data: bytes, where: str) -> dict:
    try:
        obj = _SafeUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as exc:  # noqa: BLE001 - any failure means a malformed or hostile file
        raise DataError(f"{where}: cannot read CIFAR batch ({exc})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: CIFAR batch is not a dict")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _cifar_members(root: Path, folder: str, archive: str, names: list[str], meta: DatasetInfo) -> dict[str, tuple[str, bytes]]:
    """Read batch files from ``root/folder`` or from the archive ``root/archive``."""
    d = root / folder
    if d.is_dir():
        out = {}
        for n in names:
            p = d / n
            if not p.is_file():
                raise _missing(meta, p, "CIFAR batch file")
            out[n] = (str(p), p.read_bytes())
        return out
    a = root / archive
    if not a.is_file():
        raise _missing(meta, d, f"folder {folder} (or archive {archive})")
    try:
        with tarfile.open(a, "r:*") as tf:
            out = {}
            for n in names:
                try:
                    member = tf.getmember(f"{folder}/{n}")
                except KeyError:
                    raise DataError(f"{a}: archive has no member {folder}/{n}: {meta.how_to_get}") from None
                out[n] = (f"{a}:{folder}/{n}", tf.extractfile(member).read())
            return out
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataError(f"{a}: cannot read archive ({exc}): {meta.how_to_get}") from None


def _cifar_arrays(members, label_key: str, meta: DatasetInfo):
    xs, ys = [], []
    for where, blob in members.values():
        d = safe_unpickle(blob, where)
        if "data" not in d or label_key not in d:
            raise DataError(f"{where}: missing 'data' or '{label_key}' entry")
        data = np.asarray(d["data"], dtype=np.uint8)
        labels = np.asarray(d[label_key], dtype=np.int64)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
            raise DataError(f"{where}: expected data of shape (N, 3072) matching {len(labels)} labels, got {data.shape}")
        if labels.size and (labels.min() < 0 or labels.max() >= meta.num_classes):
            raise DataError(f"{where}: labels outside [0, {meta.num_classes})")
        xs.append(data.reshape(-1, 3, 32, 32))
        ys.append(labels)
    return np.concatenate(xs), np.concatenate(ys)


def _load_cifar10(root: Path, split: str, meta: DatasetInfo):
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    return _cifar_arrays(_cifar_members(root, "cifar-10-batches-py", "cifar-10-python.tar.gz", names, meta),
                         "labels", meta)


def _load_cifar100(root: Path, split: str, meta: DatasetInfo):
    return _cifar_arrays(_cifar_members(root, "cifar-100-python", "cifar-100-python.tar.gz", [split], meta),
                         "fine_labels", meta)


# --------------------------------------------------------------------------------------------------
# TinyImageNet-200
# --------------------------------------------------------------------------------------------------
def _read_rgb64(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"{path}: cannot decode image ({exc})") from None
    if arr.shape != (64, 64, 3):
        raise DataError(f"{path}: expected a 64x64 image, got {arr.shape[:2]}")
    return arr.transpose(2, 0, 1)


def _load_tinyimagenet(root: Path, split: str, meta: DatasetInfo):
    base = root / "tiny-imagenet-200" if (root / "tiny-imagenet-200").is_dir() else root
    wnids_file = base / "wnids.txt"
    if not wnids_file.is_file():
        raise _missing(meta, root / "tiny-imagenet-200" / "wnids.txt", "wnids.txt")
    wnids = [w.strip() for w in wnids_file.read_text().split() if w.strip()]
    index = {w: i for i, w in enumerate(wnids)}
    items: list[tuple[Path, int]] = []
    if split == "train":
        for w in wnids:
            d = base / "train" / w / "images"
            if not d.is_dir():
                raise _missing(meta, d, "training class folder")
            items += [(p, index[w]) for p in sorted(d.iterdir()) if p.suffix.lower() in (".jpeg", ".jpg", ".png")]
    else:
        ann = base / "val" / "val_annotations.txt"
        if not ann.is_file():
            raise _missing(meta, ann, "val_annotations.txt")
        for lineno, line in enumerate(ann.read_text().splitlines(), 1):
            parts = line.split("\t")
            if len(parts) < 2 or parts[1] not in index:
                raise DataError(f"{ann}: line {lineno}: expected '<file>\\t<wnid>...' with a wnid from wnids.txt")
            items.append((base / "val" / "images" / parts[0], index[parts[1]]))
    if not items:
        raise DataError(f"{base}: no images found for split {split!r}: {meta.how_to_get}")
    x = np.stack([_read_rgb64(p) for p, _ in items])
    y = np.array([c for _, c in items], dtype=np.int64)
    return x, y
