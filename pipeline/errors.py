"""The one base class of every error a user can cause (a bad config, dataset file, checkpoint or store file).

The CLI catches ``UserError`` anywhere in an exception's chain (including errors raised inside Ray tasks, actors
and Ray Train workers), prints its first line and exits with its ``exit_code``; anything else is a bug and keeps
its traceback. Each layer subclasses it where the error arises (``ConfigError`` in config.py, ``DataError`` in
data.py, ``ModelError`` in models/, ``StoreError`` in store.py, ``EvalError`` in evaluation.py).

A full disk is a user error too: ``DiskFull``, raised by ``pipeline.store.atomic_file`` (through which every store
file is written), and made by ``find_user_error`` from any bare ``OSError`` with ``ENOSPC``, ``EDQUOT`` or
``EROFS`` found in a chain (one raised by a library, by Ray, outside ``atomic_file``).

A user error crosses a process boundary one way, as its ``record()`` (class name, one-line message, exit code: plain
JSON, nothing to unpickle), made into the same UserError again by ``UserError.from_record``: pickling one (a Ray
task's or actor's exception) goes through it (``__reduce__``), a Ray Data unit worker returns it in its row's
``error`` column (Ray Data keeps no exception's class), a Ray Train worker writes it to a JSON file for the driver
(a worker group that fails is restarted by Ray Train, one that returns is not). On the driver it is raised again as
what it was: a full disk in a Ray Train worker is still a ``DiskFull``.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path

from .log import human_bytes

EXIT_CONFIG = 2  # invalid config, override, config path or setting that contradicts the model or data;
#                  a store too small for the stages about to run (the preflight's free-space check)
EXIT_FAILED = 1  # bad data, checkpoint, corrupt or unwritable store, missing upstream output, a full disk
EXIT_TERMINATED = 143  # SIGTERM (128 + 15), like the shell's convention; Ctrl-C (SIGINT) is 130

# errno -> what the one line says: the disk (or the quota) is full, or the filesystem is mounted read-only.
FULL = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
        errno.EROFS: "read-only filesystem"}


_CLASSES: dict[str, type] = {}  # UserError and its subclasses by name, for ``UserError.from_record``


class UserError(RuntimeError):
    """An error the user can fix; ``str(err)`` is one line naming the file, key or shard."""

    exit_code = EXIT_FAILED

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if not cls.__module__.startswith("ray"):  # not the dual classes Ray derives from a task's exception
            _CLASSES.setdefault(cls.__name__, cls)

    def record(self) -> dict:
        """What crosses a process boundary (JSON): the class's name, the one line, the exit code."""
        return {"class": type(self).__name__, "message": one_line(self), "exit_code": int(self.exit_code)}

    @staticmethod
    def from_record(rec: dict) -> "UserError":
        """The UserError ``record()`` made: its class where this process knows it (else UserError), message and
        exit code. Not through the class's ``__init__``, whose arguments (a ConfigError's source and key) the
        record does not keep."""
        cls = _CLASSES.get(str(rec.get("class")), UserError)
        err = cls.__new__(cls)
        RuntimeError.__init__(err, str(rec["message"]))
        err.exit_code = int(rec["exit_code"])
        return err

    def __reduce__(self):
        return UserError.from_record, (self.record(),)


_CLASSES["UserError"] = UserError


class DiskFull(UserError):
    """Writing a store file failed on a full disk, an exhausted quota or a read-only filesystem. The message names
    the file and the free space left there; the CLI adds what the stage still needs (``pipeline.plan``)."""


class OptionError(UserError):
    """A command-line option the library cannot honour (a bad value, or two options that exclude each other)."""

    exit_code = EXIT_CONFIG


class NotEnoughSpace(UserError):
    """The preflight: the free space under --store is less than the stages about to run write (estimate)."""

    exit_code = EXIT_CONFIG


def free_bytes(path: str | Path) -> int | None:
    """Bytes an unprivileged writer may still use on the filesystem holding ``path`` (or its nearest existing
    parent); None when that cannot be asked."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


# Temporaries named by pipeline.store.temp_path (.<name>.tmp-<pid>-<random>) and zarr's (<name>.<uuid>.partial).
_TEMP_NAMES = [re.compile(r"^\.(?P<name>.+)\.tmp-\d+-[0-9a-f]+$"), re.compile(r"^(?P<name>.+)\.[0-9a-f]{32}\.partial$")]


def final_name(path: str | Path) -> Path:
    """The file a temporary stands for (the one the user will look for), else ``path`` itself."""
    p = Path(path)
    for pat in _TEMP_NAMES:
        m = pat.match(p.name)
        if m:
            return p.with_name(m.group("name"))
    return p


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in FULL


def disk_full(exc: OSError, path: str | Path | None = None) -> DiskFull:
    """The one-line error for an OSError of ``FULL``: the file it names (``path``, else the error's own
    filename), why, and the free space left there."""
    where = path if path is not None else exc.filename
    if where is None:
        return DiskFull(f"writing the store failed: {FULL[exc.errno]} (errno {errno.errorcode[exc.errno]})")
    where = final_name(os.fsdecode(where))
    free = free_bytes(where.parent)
    left = f" ({human_bytes(free)} free there)" if free is not None and exc.errno != errno.EROFS else ""
    return DiskFull(f"{where}: {FULL[exc.errno]}{left}")


def _links(e: BaseException) -> list:
    """The exceptions ``e`` wraps: Python's ``__cause__``/``__context__``, Ray's ``cause`` (RayTaskError and the
    dual classes ``as_instanceof_cause`` makes), Ray Train's ``worker_failures`` (WorkerGroupError) and
    ``controller_failure`` (ControllerError)."""
    failures = getattr(e, "worker_failures", None)
    return [getattr(e, "cause", None), getattr(e, "controller_failure", None),
            *(failures.values() if isinstance(failures, dict) else ()), e.__cause__, e.__context__]


def _chain(exc: BaseException | None):
    """``exc`` and every exception it wraps (``_links``), depth first, each once."""
    seen, stack = set(), [exc]
    while stack:
        e = stack.pop()
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        stack += reversed(_links(e))


def find_user_error(exc: BaseException | None) -> UserError | None:
    """The first UserError in the chain of ``exc`` (``__cause__``, ``__context__`` and Ray's wrappers, see
    ``_links``), or None; a bare OSError of a full disk (``FULL``) met first is returned as ``DiskFull``.
    Ray re-raises a task's exception as a class deriving from both RayTaskError and the original class; its
    ``cause`` is the original, whose message is the one line we want."""
    for e in _chain(exc):
        if not type(e).__module__.startswith("ray"):
            if isinstance(e, UserError):
                return e
            if is_disk_full(e):
                return disk_full(e)
    return None


# Ray's errors for a process or node that went away (not an exception raised by the project's code in a task)
_RAY_LOSSES = ("RayActorError", "ActorUnavailableError", "ObjectLostError", "WorkerCrashedError", "NodeDiedError",
               "LocalRayletDiedError", "RaySystemError")


def lost_to_ray(exc: BaseException | None) -> bool:
    """Whether the chain of ``exc`` holds one of Ray's errors for a lost worker, actor, object or node (their
    subclasses included: ``ActorDiedError``, ``OwnerDiedError``, ...)."""
    return any(c.__module__.startswith("ray") and c.__name__ in _RAY_LOSSES
               for e in _chain(exc) for c in type(e).__mro__)


def out_of_memory(exc: BaseException | None) -> str | None:
    """Ray's memory monitor killed a worker (``OutOfMemoryError``, or Ray Train's failure that quotes it): the
    node's use against its limit as Ray measured it (``22.43GB used / 23.54GB limit``), "" where Ray gave none;
    None for any other error."""
    for e in _chain(exc):
        text = str(e)
        if (type(e).__name__ == "OutOfMemoryError" and type(e).__module__.startswith("ray")) \
                or "running low on memory" in text:
            m = re.search(r"was ([\d.]+ ?GB) used / ([\d.]+ ?GB) limit", text)
            return f"{m.group(1)} used / {m.group(2)} limit" if m else ""
    return None


def one_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__
