"""Run a stage's units of work on a Ray Data actor pool, with progress and a summary.

A unit is one output shard. Each actor loads its model once (in ``__init__``), is handed unit descriptions
one at a time (``batch_size=1``), writes the unit's files plus its receipt into the store, and returns a
row ``{"unit", "items", "bytes", "error"}``. The driver streams those rows for progress. Units already holding a
receipt are skipped, which is what makes a killed stage resumable.
"""
from __future__ import annotations

import json
import time
import warnings

import numpy as np

from pipeline.cluster import cluster_gpus, device_for, worker_resources
from pipeline.context import Context
from pipeline.errors import UserError, find_user_error
from pipeline.log import Progress, human_bytes
from pipeline.store import Output


class UnitWorker:
    """Base of the stages' Ray Data actors: ``do_unit(unit_dict) -> receipt`` is called once per unit.

    A user error (a corrupt shard, bad data, a full disk) comes back as its record (``UserError.record``, JSON) in
    the row's ``error`` column, which the driver raises again as the same error: Ray Data does not carry an
    exception's class back to the driver, and its own report of a failed UDF is a long traceback.
    """

    def __call__(self, batch: dict) -> dict:
        rows = {"unit": [], "items": [], "bytes": [], "error": []}
        for i in range(len(batch["unit"])):
            unit = {k: (v[i].item() if hasattr(v[i], "item") else v[i]) for k, v in batch.items()}
            try:
                rec = self.do_unit(unit)
                error, written = "", sum(f["bytes"] for f in rec["files"])
            except Exception as exc:  # noqa: BLE001
                err = find_user_error(exc)  # also a bare OSError of a full disk (zarr's own atomic writes)
                if err is None:
                    raise
                error, written = json.dumps(err.record()), 0
            rows["unit"].append(str(unit["unit"]))
            rows["items"].append(0 if error else int(unit["items"]))
            rows["bytes"].append(written)
            rows["error"].append(error)
        return {k: np.array(v) for k, v in rows.items()}

    def do_unit(self, unit: dict) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError


def pool_size(ctx: Context, n_units: int) -> int:
    wanted = ctx.workers or max(1, cluster_gpus())
    return max(1, min(wanted, n_units))


def run_units(ctx: Context, out: Output, *, stage: str, worker_cls, worker_kwargs: dict, units: list[dict],
              total_items: int, done_items: int, unit_name: str = "examples") -> dict:
    """Process ``units`` (dicts with at least 'unit' and 'items') and return summary numbers."""
    import ray
    import ray.data

    t0 = time.perf_counter()
    progress = Progress(stage, total_items, unit_name, log=ctx.log, done=done_items)
    written = 0
    if units:
        n = pool_size(ctx, len(units))
        res = worker_resources(n)
        ctx.log(f"[{stage}] {len(units)} unit(s) to do on {n} worker(s), each {res['num_cpus']} CPU / "
                f"{res['num_gpus']} GPU ({device_for(res)})")
        kwargs = {**worker_kwargs, "device": device_for(res), "threads": int(res["num_cpus"])}
        ds = ray.data.from_items(units, override_num_blocks=len(units))
        with warnings.catch_warnings():  # max_restarts has no named parameter yet (Ray's own advice, see below)
            warnings.simplefilter("ignore", DeprecationWarning)
            ds = ds.map_batches(worker_cls, fn_constructor_kwargs=kwargs, batch_size=1, batch_format="numpy",
                                compute=ray.data.ActorPoolStrategy(size=n), num_cpus=res["num_cpus"],
                                num_gpus=res["num_gpus"],
                                # A lost actor is not restarted (Ray could not: its constructor arguments live in
                                # the object store, ray-project/ray#53727); the stage fails and a re-run resumes
                                # from the finished units' receipts.
                                max_restarts=0)
        for row in ds.iter_rows():
            if row["error"]:
                raise UserError.from_record(json.loads(str(row["error"])))
            written += int(row["bytes"])
            progress.update(int(row["items"]))
    seconds = time.perf_counter() - t0
    done_now = progress.done - done_items
    ctx.log(f"[{stage}] summary: {done_now} {unit_name} in {len(units)} unit(s), {human_bytes(written)} written, "
            f"{done_now / seconds if seconds > 0 else 0:.1f} {unit_name}/s, {seconds:.1f} s")
    return {"items": done_now, "bytes": written, "seconds": seconds}


def ref_box(obj):
    """Put ``obj`` in Ray's object store, boxed in a list so actor constructors receive the reference
    itself (and ``ray.get`` it once) rather than Ray Data copying the value into every call."""
    import ray

    return [ray.put(obj)]


def unbox(box):
    import ray

    return ray.get(box[0])


