"""The content-addressed store: one directory per stage output, named by a hash of all that determines it.

    <root>/<dataset>/<stage>/<key>/
        ...unit files...            written under a temporary name, then renamed
        _units/<unit>.json          receipt per finished unit of work (files, sizes, sha256): resumability
        manifest.json               written last, atomically: without it the directory is never read as done

A stage that finds a complete manifest for its key is a cache hit. A stage that finds receipts but no
manifest resumes: it redoes only the units without a receipt. See storage_layout.md.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import secrets
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Iterable

from .errors import UserError, disk_full, is_disk_full

MANIFEST = "manifest.json"
UNITS = "_units"
FORMAT_VERSION = 1


class StoreError(UserError):
    """A stage output is missing, incomplete, truncated or altered. The message names the file."""


def package_version() -> str:
    try:
        return metadata.version("carso-pipeline")
    except metadata.PackageNotFoundError:  # running from a source tree
        return "0+source"


def sha256_file(path: Path, bufsize: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def array_sha256(*tensors) -> str:
    """sha256 of tensors' bytes (the data a stage actually read, recorded in its manifest)."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


TEMP_MARK = ".tmp-"  # every temporary in the store is named .<final name>.tmp-<pid>-<random>


def temp_path(path: Path) -> Path:
    """The one temporary-name scheme of the store: ``.<name>.tmp-<pid>-<random>`` beside ``path`` (unique per
    writer, recognised by ``stale_temporaries``)."""
    return path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")


@contextmanager
def atomic_file(path: Path):
    """Yield a temporary path beside ``path``; on success fsync it and rename it to ``path`` (readers see the old
    file or the whole new one), on failure remove it. A full disk, an exhausted quota or a read-only filesystem
    (while writing, fsyncing or renaming) becomes ``DiskFull`` naming ``path`` and the free space left, after
    the temporary is removed: nothing half-written stays under either name."""
    tmp = temp_path(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        if not is_disk_full(exc):
            raise
        _discard(tmp)  # first, so the free space the message states counts it out
        raise disk_full(exc, path) from exc
    finally:
        _discard(tmp)


def _discard(tmp: Path) -> None:
    """Remove a temporary; never raise over the error being handled (on a read-only filesystem nothing was
    written; a temporary left otherwise is found by ``stale_temporaries``)."""
    try:
        tmp.unlink(missing_ok=True)
    except OSError:
        pass


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


class _HashingWriter:
    """A write-only file object that counts and hashes what passes through it."""

    def __init__(self, f):
        self.f, self.sha, self.bytes, self.error = f, hashlib.sha256(), 0, None

    def write(self, data) -> int:
        try:
            n = self.f.write(data)
        except OSError as exc:  # kept: torch's writer reports it as a RuntimeError of its own
            self.error = exc
            raise
        self.sha.update(data)
        self.bytes += len(data)
        return n

    def flush(self) -> None:
        self.f.flush()


def atomic_torch_save(path: Path, obj) -> dict:
    """``torch.save(obj)`` into the store as ``atomic_file`` writes (temporary, fsync, rename), streamed: the bytes
    go to the temporary as torch writes them and are hashed on the way, so the file is never held whole in memory
    and never read back for its sha256. The bytes are those ``torch.save`` writes into a ``BytesIO`` (the same
    writer path). Returns the file's size and sha256 (``file_record``'s fields, for ``sha256=``). For a 2 GB
    checkpoint (the full-size CIFAR-10 purifier with its optimizer) this spares two whole-file copies in memory
    and a second read."""
    import torch

    with atomic_file(path) as tmp:
        with open(tmp, "wb") as f:
            w = _HashingWriter(f)
            try:
                torch.save(obj, w)
            except Exception:
                if w.error is not None:  # a write failed (e.g. a full disk): that, for atomic_file to report
                    raise w.error from None
                raise
    return {"bytes": w.bytes, "sha256": w.sha.hexdigest()}


LOCKS, LOCK_SUFFIX = ".locks", ".lock"


@contextmanager
def output_lock(out: "Output"):
    """An advisory lock on one output directory (``<root>/.locks/<dataset>-<stage>-<key>.lock``; ``flock``,
    released when the process ends, however it ends). A second run on the same output refuses with one line
    naming the holder. Across cluster nodes it holds where the shared filesystem implements ``flock`` (NFSv4,
    Lustre, local disks)."""
    dataset_dir = out.dir.parent.parent
    path = dataset_dir.parent / LOCKS / f"{dataset_dir.name}-{out.stage}-{out.key}{LOCK_SUFFIX}"
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise StoreError(f"{out.dir}: being written by {holder}; wait for that run to finish (or stop it), "
                         f"then run again") from None
    try:
        f.seek(0)
        f.truncate()
        try:
            f.write(f"pid {os.getpid()} on {socket.gethostname()} since "
                    f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime())}\n")
            f.flush()
        except OSError as exc:  # a full disk may leave no room for the holder's line
            if is_disk_full(exc):
                raise disk_full(exc, path) from None
            raise
        yield
    finally:
        f.truncate(0)
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


def has_files(directory: Path) -> bool:
    return directory.is_dir() and any(p.is_file() for p in directory.rglob("*"))


def stale_temporaries(directory: Path) -> list[Path]:
    """Temporaries under ``directory`` whose writing process is gone. Call it while holding the output's lock
    (``output_lock``): then no other run writes there, and the only live writer is this process."""
    found = []
    for p in directory.rglob(f".*{TEMP_MARK}*"):
        pid = p.name.rsplit(TEMP_MARK, 1)[1].split("-")[0]
        if not pid.isdigit() or int(pid) != os.getpid():
            found.append(p)
    return found


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def _seal(payload) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_sealed_json(path: Path, payload) -> None:
    """A standalone store file (no manifest of its own): the payload with its sha256, written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {"sha256": _seal(payload), "payload": payload})


def read_sealed_json(path: Path):
    """The payload of ``write_sealed_json``, or None when the file does not exist; StoreError naming the file
    when it is unreadable or its content does not match its sha256."""
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise StoreError(f"{path}: corrupt (not JSON); delete it to recompute") from None
    if not isinstance(doc, dict) or "payload" not in doc or doc.get("sha256") != _seal(doc["payload"]):
        raise StoreError(f"{path}: content altered (sha256 differs from its seal); delete it to recompute")
    return doc["payload"]


def file_record(root: Path, path: Path, sha256: str | None = None) -> dict:
    """A file's name (relative to ``root``), size and sha256; ``sha256``: the hash its writer computed on the way
    (``atomic_torch_save``) instead of reading the file again."""
    return {"name": str(path.relative_to(root)), "bytes": path.stat().st_size,
            "sha256": sha256 if sha256 is not None else sha256_file(path)}


@dataclass
class Output:
    """One stage output directory."""

    dir: Path
    stage: str
    key: str
    # The writing stage's code VERSION (recorded in the manifest); None where an output is only read.
    code_version: int | None = None
    spec: dict | None = None  # what determines this output (pipeline.spec.Spec.as_dict), stored in its manifest

    @property
    def manifest_path(self) -> Path:
        return self.dir / MANIFEST

    def is_complete(self) -> bool:
        return self.manifest_path.is_file()

    def manifest(self) -> dict:
        try:
            doc = json.loads(self.manifest_path.read_text())
        except FileNotFoundError:
            raise StoreError(f"{self.dir}: {self.stage} output is incomplete (no {MANIFEST}); run the stage") from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise StoreError(f"{self.manifest_path}: corrupt manifest (not JSON)") from None
        if not isinstance(doc, dict):
            raise StoreError(f"{self.manifest_path}: corrupt manifest (not a JSON object)")
        return doc

    # ---- units (resumability) -------------------------------------------------------------------
    def unit_receipt(self, unit: str) -> Path:
        return self.dir / UNITS / f"{unit}.json"

    def done_units(self) -> set[str]:
        d = self.dir / UNITS
        return {p.stem for p in d.glob("*.json")} if d.is_dir() else set()

    def write_receipt(self, unit: str, files: Iterable[Path], hashes: dict[Path, str] | None = None,
                      **extra) -> dict:
        """Record a finished unit's files (size and sha256; ``hashes``: sha256s already known, by path)."""
        hashes = hashes or {}
        rec = {"unit": unit, "files": [file_record(self.dir, p, hashes.get(p)) for p in files], **extra}
        path = self.unit_receipt(unit)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, rec)
        return rec

    def receipts(self) -> list[dict]:
        d = self.dir / UNITS
        return [json.loads(p.read_text()) for p in sorted(d.glob("*.json"))] if d.is_dir() else []

    # ---- completion -------------------------------------------------------------------------------
    def finalize(self, *, inputs: dict, files: list[dict], counts: dict, timings: dict,
                 extra: dict | None = None) -> dict:
        manifest = {"format": FORMAT_VERSION, "stage": self.stage, "key": self.key, "code_version": self.code_version,
                    "spec": self.spec,
                    "inputs": inputs, "files": sorted(files, key=lambda r: r["name"]), "counts": counts,
                    "timings": timings, "package_version": package_version(), "python": platform.python_version(),
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **(extra or {})}
        atomic_write_json(self.manifest_path, manifest)
        return manifest


@dataclass
class Store:
    root: Path

    def __post_init__(self):
        self.root = Path(self.root)

    def output(self, dataset: str, stage: str, key: str, create: bool = False) -> Output:
        d = self.root / dataset / stage / key
        if create:
            d.mkdir(parents=True, exist_ok=True)
        return Output(d, stage, key)

    def all_outputs(self) -> list[Output]:
        return [Output(p.parent, p.parent.parent.name, p.parent.name)
                for p in sorted(self.root.glob(f"*/*/*/{MANIFEST}"))]


# Working state a finished output may hold besides its listed files: receipts, the purifier's last two
# checkpoints (to resume or continue training) and Ray Train's bookkeeping.
WORKING_DIRS = (UNITS, "checkpoints", "ray_train")


def verify_output(out: Output, names: Iterable[str] | None = None, quick: bool = False) -> list[str]:
    """Check every file listed in the manifest (or only ``names``) for presence, size and sha256; with no
    ``names``, also report files the manifest does not list (a killed writer's temporaries included). ``quick``:
    only that the manifest parses and its files exist at their sizes (what a cache hit checks; each reading
    stage checks the sha256 of what it reads). Return one problem line per bad file (empty when all is well)."""
    problems = []
    try:
        manifest = out.manifest()
        files = manifest["files"]
    except StoreError as exc:
        return [str(exc)]
    except (KeyError, TypeError):
        return [f"{out.manifest_path}: corrupt manifest (no file list)"]
    if quick:
        return [p for rec in files for p in check_file(out.dir, rec, hash_=False)]
    wanted = set(names) if names is not None else None
    for rec in manifest["files"]:
        if wanted is not None and rec["name"] not in wanted:
            continue
        problems += check_file(out.dir, rec)
    if wanted is None:
        listed = {rec["name"] for rec in manifest["files"]} | {MANIFEST}
        for p in sorted(out.dir.rglob("*")):
            rel = p.relative_to(out.dir)
            if TEMP_MARK in p.name:
                problems.append(f"{p}: leftover temporary of an interrupted writer (`pipeline verify --fix` removes it)")
            elif p.is_file() and str(rel) not in listed and rel.parts[0] not in WORKING_DIRS:
                problems.append(f"{p}: not listed in {out.manifest_path}")
    return problems


def empty_key_folders(root: Path, stages: Iterable[str]) -> list[Path]:
    """Key folders (``<dataset>/<stage>/<key>``) holding no file at all: what a run that failed before writing
    anything would leave (runs remove them; an older version or a crash may not have)."""
    return [d for s in stages for d in sorted(root.glob(f"*/{s}/*")) if d.is_dir() and not has_files(d)]


def check_file(root: Path, rec: dict, hash_: bool = True) -> list[str]:
    path = root / rec["name"]
    if not path.is_file():
        return [f"{path}: missing"]
    size = path.stat().st_size
    if size != rec["bytes"]:
        return [f"{path}: truncated or resized ({size} bytes, manifest says {rec['bytes']})"]
    if hash_ and sha256_file(path) != rec["sha256"]:
        return [f"{path}: content altered (sha256 differs from the manifest)"]
    return []


def require_intact(out: Output, rec: dict) -> None:
    """Raise StoreError naming the file if it does not match its manifest record."""
    problems = check_file(out.dir, rec)
    if problems:
        raise StoreError(problems[0] + "; run `pipeline verify` and re-run the stage that wrote it")
