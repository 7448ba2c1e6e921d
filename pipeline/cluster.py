"""Ray start/connect and per-task resource requests. Nothing here assumes a single node."""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import shutil
import signal
import time
from pathlib import Path

import torch

# glibc malloc: the mmap threshold and trim threshold a long-running process reaches by itself (malloc's dynamic
# threshold stops at 32 MiB, and the trim threshold follows at twice that). See ``prepare_worker``.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MALLOC_MMAP_THRESHOLD = 32 << 20
MALLOC_TRIM_THRESHOLD = 64 << 20


_STARTING_LOCAL = {"on": False}


def _own_process_group() -> None:
    """In a child forked while ``connect`` starts a local Ray instance (Ray starts its GCS, raylet and monitors
    through ``subprocess`` with a ``preexec_fn``, which runs Python's at-fork hooks): a process group of its own,
    which the raylet's workers inherit. See ``connect``."""
    if _STARTING_LOCAL["on"]:
        try:
            os.setpgid(0, 0)
        except OSError:  # pragma: no cover - already a group leader
            pass


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_own_process_group)


def connect(address: str | None, log=print, verbose: bool = False) -> None:
    """Start a local Ray instance (``address=None``) or join a cluster (``'auto'`` or ``'ray://host:port'``).
    Unless ``verbose``, Ray's own output (its workers' stdout and stderr, Ray Train's reports, its warnings) stays
    in Ray's log files (``save_logs`` copies them into the store) and the console shows only the project's lines."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if not verbose:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")      # no token-authentication banner on a local instance
        logging.getLogger("ray").setLevel(logging.ERROR)
    kwargs = dict(include_dashboard=False, logging_level=logging.WARNING if verbose else logging.ERROR,
                  log_to_driver=verbose)
    if address in (None, "", "local"):
        # A local instance's processes run outside the driver's process group: a SIGTERM to that group (`timeout`,
        # a shell's job control, a scheduler that signals the job's group) then reaches the driver alone, whose
        # handler (pipeline.cli) stops the stage and then Ray, in that order. With Ray's processes signalled too,
        # a group SIGTERM once ended the driver with exit 1 and no last line, most likely because the GCS and
        # raylet exited while the driver still talked to them (a rare race, not reproduced). They still end with the driver:
        # Ray ties them to it (kernel fate-sharing) and ``stop_local`` waits for them.
        # Two of Ray Train's defaults that serve clusters, changed on a local instance only (its workers inherit
        # this environment; a value set before stays as set): the controller polls its workers every 0.5 s instead
        # of 2 s, so the end of a purifier run is seen sooner (the toy purifier stage, CLI included: 27.3 s ->
        # 25.1 s over two runs each on 2 cores), and no actor watches for a cloud node's preemption notice (one
        # process fewer to start on a machine that is not preempted).
        os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        _STARTING_LOCAL["on"] = True
        try:
            ray.init(num_cpus=os.cpu_count(), **kwargs)
        finally:
            _STARTING_LOCAL["on"] = False
        where = "local Ray instance"
    else:
        ray.init(address=address, **kwargs)
        where = f"Ray cluster at {address}"
    res = ray.cluster_resources()
    log(f"[ray] {where}: {int(res.get('CPU', 0))} CPUs, {int(res.get('GPU', 0))} GPUs, "
        f"{len(ray.nodes())} node(s)")
    import ray.data

    logging.getLogger("ray.data").setLevel(logging.WARNING if verbose else logging.ERROR)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the stages print their own progress lines
    ctx.print_on_execution_start = False


def _descendants() -> list[int]:
    """Every live process below this one (Linux: read from /proc; elsewhere none are known)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(entry.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry.parent.name))
    found, todo = [], [os.getpid()]
    while todo:
        for c in children.get(todo.pop(), []):
            found.append(c)
            todo.append(c)
    return found


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has stopped running


def stop_local(timeout: float = 30.0) -> None:
    """Shut down the local Ray instance this process started and wait (up to ``timeout`` s, then SIGKILL) until
    its processes, the raylet and the workers below it, have exited: after this returns nothing of the run
    writes into the store any more."""
    import ray

    pids = _descendants()
    ray.shutdown()
    deadline = time.monotonic() + timeout
    while (alive := [p for p in pids if _alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in alive:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def cluster_gpus() -> int:
    import ray

    return int(ray.cluster_resources().get("GPU", 0))


def cpus_per_node() -> int:
    """The largest CPU count of any alive node (what one CPU-only task can ask for)."""
    import ray

    return max(int(n["Resources"].get("CPU", 1)) for n in ray.nodes() if n.get("Alive"))


def default_workers() -> int:
    """Model workers when ``--workers`` is not given, for stages whose units are independent: one per GPU of the
    cluster, else one per CPU core of the largest node."""
    return cluster_gpus() or cpus_per_node()


def worker_resources(workers: int = 1) -> dict:
    """Resources for one of ``workers`` concurrent model workers: one GPU each when the cluster has GPUs,
    otherwise an equal share of a node's CPUs (torch threads follow the CPU count)."""
    return worker_share(workers, cluster_gpus(), cpus_per_node())


def worker_share(workers: int, gpus: int, cpus: int) -> dict:
    """``worker_resources`` for a machine with ``gpus`` GPUs and ``cpus`` CPUs (no Ray needed: ``pipeline plan
    --calibrate`` sizes its timers with it)."""
    if gpus:
        return {"num_gpus": 1, "num_cpus": 1}
    return {"num_gpus": 0, "num_cpus": max(1, cpus // max(1, workers))}


def prepare_worker(threads: int) -> None:
    """What every compute process of a stage does first (a Ray task, actor or Ray Train worker): torch's thread
    count, and glibc malloc's thresholds pinned at the values a long-running process reaches by itself.

    Why the thresholds: PyTorch allocates each CPU tensor with malloc. glibc serves an allocation above its mmap
    threshold (128 KiB at first, raised on the fly as big blocks are freed) with a fresh mmap and returns it to
    the kernel on free, and gives the top of its heap back above its trim threshold; every page of such memory
    faults again, zero-filled, when the next tensor touches it. A plain process that loaded its data first has
    had its thresholds raised by those big frees; a Ray worker that received the same data deserialised has
    not always, and adversarial training there took up to 10-50x the page faults and ran 10-40% slower (bench/README.md; ``bench/classifier_throughput.py`` reports the faults, ``tests/test_worker_setup.py`` shows it).
    Numbers are unchanged: only where the memory comes from differs. Without glibc (macOS, musl) this sets the
    threads only."""
    torch.set_num_threads(threads)
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # no glibc: nothing to pin
        return
    mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD)
    mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD)


def device_for(resources: dict) -> str:
    return "cuda" if resources.get("num_gpus") else "cpu"


def session_dir() -> Path | None:
    """This Ray session's folder on this node (None where Ray does not say: a private API)."""
    import ray

    try:
        return Path(ray._private.worker._global_node.get_session_dir_path())
    except Exception:  # noqa: BLE001 - without it the logs stay where Ray put them
        return None


def save_logs(dest_root, session: Path | None = None) -> str | None:
    """Copy a Ray session's log files (this node's; by default the connected session's) into
    ``dest_root/<session>/``; return that path."""
    session = session or session_dir()
    if session is None or not (session / "logs").is_dir():
        return None
    dest = Path(dest_root) / session.name
    shutil.copytree(session / "logs", dest, dirs_exist_ok=True, ignore_dangling_symlinks=True,
                    ignore=shutil.ignore_patterns("*.sock", "events"))
    return str(dest)
