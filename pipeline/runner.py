"""The stage graph: keys, dependencies, cache hits, dispatch. The CLI calls only into this module."""
from __future__ import annotations

import importlib
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import preflight
from .config import RunConfig, fingerprint
from .errors import UserError
from .log import echo, human_seconds
from .store import (Output, Store, StoreError, empty_key_folders, has_files, output_lock, stale_temporaries,
                    verify_output)

# Stage name -> module (each exposes ``key(ctx)`` and ``run(ctx, out)``), in pipeline order.
STAGES = {
    "classifier": "stages.classifier",
    "attacks": "stages.attacks",
    "activations": "stages.activations",
    "purifier": "stages.purifier",
    "evaluate": "stages.evaluate",
}


class UpstreamMissing(UserError):
    """A stage's key depends on an upstream output that does not exist yet."""


@dataclass
class Context:
    cfg: RunConfig
    store: Store
    ray_address: str | None = None
    # Model workers per stage (runtime only, never part of a key); None = one per GPU, or 1 on CPU.
    workers: int | None = None
    log: Callable[[str], None] = echo
    # Ray's own output on the console too (otherwise it goes to Ray's log files, copied into <store>/logs/).
    verbose: bool = False
    _ray_ready: bool = field(default=False, repr=False)

    def ray(self) -> None:
        """Connect to Ray on first use (cache hits never start Ray)."""
        if not self._ray_ready:
            from .cluster import connect

            connect(self.ray_address, log=self.log, verbose=self.verbose)
            self._ray_ready = True

    def output(self, stage: str, create: bool = False) -> Output:
        out = self.store.output(self.cfg.data.dataset, stage, stage_key(self, stage), create=create)
        out.code_version = stage_module(stage).VERSION
        return out

    def output_or_none(self, stage: str, complete: bool = False) -> Output | None:
        """The output of ``stage``, or None when its key cannot be known yet (an upstream output is missing) or,
        with ``complete``, when it is not finished."""
        try:
            out = self.output(stage)
        except UpstreamMissing:
            return None
        return out if (out.is_complete() or not complete) else None

    def upstream(self, stage: str) -> Output:
        """The complete output of an upstream stage, or UpstreamMissing."""
        out = self.output(stage)
        if not out.is_complete():
            raise UpstreamMissing(f"{stage} output {out.dir} is not complete; run `--stage {stage}` first")
        return out


def stage_module(stage: str):
    return importlib.import_module(STAGES[stage])


def stage_key(ctx: Context, stage: str) -> str:
    """The store key of a stage: its module's ``key(ctx)`` (everything in the config and upstream that
    determines the output) combined with the module's code ``VERSION``, which is bumped whenever a code change
    alters what the stage writes, so an output written by older code is never served as a cache hit."""
    mod = stage_module(stage)
    return fingerprint({"stage": stage, "code_version": mod.VERSION, "inputs": mod.key(ctx)})


def run_stage(ctx: Context, stage: str, rebuild: bool = False) -> Output:
    """Run one stage into its output (a cache hit when complete, unless ``rebuild``), holding the output's lock;
    temporaries of dead writers are removed first, and a run that fails before writing a file leaves no folder."""
    mod = stage_module(stage)
    out = ctx.output(stage, create=False)
    if out.is_complete() and not rebuild:
        ctx.log(f"[{stage}] cache hit: {out.dir} (key {out.key})")
        return out
    with output_lock(out):
        if rebuild and out.dir.exists():
            ctx.log(f"[{stage}] --rebuild: removing {out.dir}")
            shutil.rmtree(out.dir)
        ctx.output(stage, create=True)
        for tmp in stale_temporaries(out.dir):
            tmp.unlink(missing_ok=True)
        done = out.done_units()
        if done:
            ctx.log(f"[{stage}] resuming {out.dir}: {len(done)} unit(s) already finished")
        else:
            ctx.log(f"[{stage}] running -> {out.dir}")
        t0 = time.perf_counter()
        try:
            mod.run(ctx, out)
        except BaseException:
            if not has_files(out.dir):
                shutil.rmtree(out.dir, ignore_errors=True)
            raise
    if not out.is_complete():  # pragma: no cover - a stage bug, never a user error
        raise StoreError(f"{out.dir}: stage '{stage}' finished without writing its manifest")
    ctx.log(f"[{stage}] done in {human_seconds(time.perf_counter() - t0)}: {out.dir}")
    return out


def run(ctx: Context, stage: str, only: bool = False, rebuild: bool = False) -> list[Output]:
    """Run a stage after every upstream stage it needs (finished ones are cache hits, like make), or all of them
    (``stage='all'``). ``only``: run just that stage, and fail with UpstreamMissing when an upstream output is
    not complete (for cluster jobs that must not start upstream work). ``rebuild``: delete and recompute the
    requested stage's output (every stage's for 'all'), e.g. after ``pipeline verify`` found it corrupt. With ``purifier.activations_source:
    recompute`` nothing reads the cached activations, so that stage is skipped as an upstream one (for
    WRN-28-10 it would write terabytes). Returns the outputs of every stage for 'all', else ``[output]``."""
    names = list(STAGES)
    targets = names if stage == "all" else [stage] if only else names[:names.index(stage) + 1]
    upstream = [s for s in targets[:-1] if not ctx.output_or_none(s, complete=True)]
    preflight.check(ctx, [s for s in targets if s == stage or s in upstream or stage == "all"])
    if stage != "all" and not only and upstream:
        ctx.log(f"[pipeline] --stage {stage} needs {', '.join(upstream)} first: running them (--only skips this)")
    outs, ran = [], False
    try:
        for s in targets:
            if s == "activations" and s != stage and ctx.cfg.purifier.activations_source == "recompute":
                ctx.log("[activations] skipped: purifier.activations_source is 'recompute'")
                continue
            ran = ran or ctx.output_or_none(s, complete=True) is None
            outs.append(run_stage(ctx, s, rebuild=rebuild and (stage == "all" or s == stage)))
    finally:
        if ran and ctx._ray_ready and not ctx.verbose:
            from .cluster import save_logs

            where = save_logs(ctx.store.root / "logs")
            if where:
                ctx.log(f"[ray] Ray's own logs (workers, Ray Train): {where} (--verbose prints them here)")
    if outs[-1].stage == "evaluate":
        ctx.log(f"[evaluate] report: {outs[-1].dir / 'report.md'}")
    return outs if stage == "all" else outs[-1:]


def status(ctx: Context) -> list[tuple[str, str, str]]:
    """(stage, state, location) for every stage of the graph."""
    preflight.check(ctx)
    rows = []
    for stage in STAGES:
        try:
            out = ctx.output(stage)
        except UpstreamMissing as exc:
            rows.append((stage, "waiting for upstream", str(exc).split(";")[0]))
            continue
        if out.is_complete():
            state = "complete"
        elif out.dir.is_dir():
            state = f"partial ({len(out.done_units())} units done)"
        else:
            state = "missing"
        rows.append((stage, state, str(out.dir)))
    return rows


@dataclass
class VerifyReport:
    lines: list[str]
    problems: list[str]
    summary: str


def verify(store: Store, ctx: Context | None = None, fix: bool = False) -> VerifyReport:
    """Every complete output of the store (or of ``ctx``'s config) checked file by file against its manifest,
    plus unlisted files and empty key folders; ``fix`` removes the leftover temporaries and empty folders."""
    if not store.root.is_dir():
        raise StoreError(f"{store.root}: no store there (not a directory); pass the store with --store")
    if ctx is not None:
        outputs = [o for o in (ctx.output_or_none(s, complete=True) for s in STAGES) if o is not None]
    else:
        outputs = store.all_outputs()
    lines, problems, fixed = [], [], 0
    for out in outputs:
        found = verify_output(out)
        if fix:
            for tmp in stale_temporaries(out.dir):
                tmp.unlink(missing_ok=True)
                fixed += 1
            found = verify_output(out)
        problems += found
        lines.append(f"{'ok ' if not found else 'BAD'} {out.stage:<12} {out.dir}")
    for d in empty_key_folders(store.root, STAGES):
        if fix:
            try:
                with output_lock(Output(d, d.parent.name, d.name)):  # never a live run's fresh folder
                    shutil.rmtree(d, ignore_errors=True)
                fixed += 1
            except StoreError as exc:
                problems.append(str(exc))
        else:
            problems.append(f"{d}: empty key folder (a failed run's; `pipeline verify --fix` removes it)")
    summary = f"{len(outputs)} output(s) checked, {len(problems)} problem(s)" + (f", {fixed} removed" if fix else "")
    return VerifyReport(lines, problems, summary)


def data_identity(cfg: RunConfig, split: str) -> dict:
    """What identifies the data a stage reads (the recorded data sha256 lives in each manifest)."""
    subset = cfg.data.train_subset if split == "train" else cfg.data.test_subset
    return {"dataset": cfg.data.dataset, "split": split, "subset": subset}


def store_root(path: str | Path) -> Store:
    return Store(Path(path))
