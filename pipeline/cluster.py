"""Ray start/connect and per-task resource requests. Nothing here assumes a single node."""
from __future__ import annotations

import logging
import os


def connect(address: str | None, log=print) -> None:
    """Start a local Ray instance (``address=None``) or join a cluster (``'auto'`` or ``'ray://host:port'``)."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    kwargs = dict(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=True)
    if address in (None, "", "local"):
        ray.init(num_cpus=os.cpu_count(), **kwargs)
        where = "local Ray instance"
    else:
        ray.init(address=address, **kwargs)
        where = f"Ray cluster at {address}"
    res = ray.cluster_resources()
    log(f"[ray] {where}: {int(res.get('CPU', 0))} CPUs, {int(res.get('GPU', 0))} GPUs, "
        f"{len(ray.nodes())} node(s)")
    import ray.data

    logging.getLogger("ray.data").setLevel(logging.WARNING)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the stages print their own progress lines
    ctx.print_on_execution_start = False


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
    gpus = cluster_gpus()
    if gpus:
        return {"num_gpus": 1, "num_cpus": 1}
    return {"num_gpus": 0, "num_cpus": max(1, cpus_per_node() // max(1, workers))}


def device_for(resources: dict) -> str:
    return "cuda" if resources.get("num_gpus") else "cpu"
