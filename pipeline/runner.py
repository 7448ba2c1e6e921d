"""The stage graph: dependencies, cache hits, locks, dispatch, verify. The CLI calls only into this module, and
this is the one module of ``pipeline/`` that imports the stages (their registry, ``stages.GRAPH``); the stages
import ``pipeline.context``, never this module."""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Mapping

import stages

from . import preflight
from .cluster import save_logs
from .context import Context as _Context
from .context import UpstreamMissing
from .log import human_seconds
from .store import (
    Output,
    Store,
    StoreError,
    empty_key_folders,
    has_files,
    output_lock,
    stale_temporaries,
    verify_output,
)

# The stage graph, in pipeline order: name -> module (stages/__init__.py).
STAGES = stages.GRAPH


@dataclass
class Context(_Context):
    """The run's context with this project's stage graph (``stages.GRAPH``)."""

    graph: Mapping[str, ModuleType] = field(default_factory=lambda: STAGES, repr=False)


def stage_module(stage: str) -> ModuleType:
    return STAGES[stage]


def needed(ctx: Context, stage: str) -> list[str]:
    """``stage`` and every stage it needs (its declared UPSTREAM, transitively), in pipeline order."""
    want, todo = {stage}, [stage]
    while todo:
        for dep in stages.upstream(todo.pop(), ctx.cfg):
            if dep not in want:
                want.add(dep)
                todo.append(dep)
    return [s for s in STAGES if s in want]


def run_stage(ctx: Context, stage: str, rebuild: bool = False) -> Output:
    """Run one stage into its output (a cache hit when complete, unless ``rebuild``), holding the output's lock;
    temporaries of dead writers are removed first, and a run that fails before writing a file leaves no folder."""
    mod = stage_module(stage)
    out = ctx.output(stage, create=False)
    if out.is_complete() and not rebuild:
        problems = verify_output(out, quick=True)  # the manifest parses; its files exist at their sizes
        if problems:
            raise StoreError(f"{problems[0]}; `pipeline run --stage {stage} --rebuild` recomputes it")
        ctx.log(f"[{stage}] cache hit: {out.dir} (key {out.key})")
        return out
    with output_lock(out):
        if rebuild and out.dir.exists():
            ctx.log(f"[{stage}] --rebuild: removing {out.dir}")
            shutil.rmtree(out.dir)
        ctx.output(stage, create=True)
        _remove_stale(out)
        done = out.done_units()
        if done:
            ctx.log(f"[{stage}] resuming {out.dir}: {len(done)} unit(s) already finished")
        else:
            ctx.log(f"[{stage}] running -> {out.dir}")
        t0 = time.perf_counter()
        try:
            with ctx.running(stage):
                mod.run(ctx, out)
            ctx.forget_keys()  # downstream keys read this output's manifest
        except BaseException:
            _stop_writers(ctx, out)
            if not has_files(out.dir):
                shutil.rmtree(out.dir, ignore_errors=True)
            raise
    if not out.is_complete():  # pragma: no cover - a stage bug, never a user error
        raise StoreError(f"{out.dir}: stage '{stage}' finished without writing its manifest")
    ctx.log(f"[{stage}] done in {human_seconds(time.perf_counter() - t0)}: {out.dir}")
    return out


def _stop_writers(ctx: Context, out: Output) -> None:
    """On the way out of a failed or interrupted stage (the output's lock held): on a local Ray instance of this
    run, save Ray's logs, stop its workers (one may be half-way through a shard) and remove what they left
    half-written. On a cluster the job's tasks end with the driver, and what they leave is removed when the stage
    resumes (above) or by ``pipeline verify --fix``. Never raises over the error being handled."""
    try:
        if ctx.stop_local_ray(logs_to=None if ctx.verbose else ctx.store.root / "logs"):
            _remove_stale(out)
    except Exception:  # noqa: BLE001
        pass


def _remove_stale(out: Output) -> None:
    """Remove the temporaries of dead writers under ``out`` (the output's lock held)."""
    for tmp in stale_temporaries(out.dir):
        tmp.unlink(missing_ok=True)


def run(ctx: Context, stage: str, only: bool = False, rebuild: bool = False) -> list[Output]:
    """Run a stage after every upstream stage it needs (finished ones are cache hits, like make), or all of them
    (``stage='all'``). ``only``: run just that stage, and fail with UpstreamMissing when an upstream output is
    not complete (for cluster jobs that must not start upstream work). ``rebuild``: delete and recompute the
    requested stage's output (every stage's for 'all'), e.g. after ``pipeline verify`` found it corrupt. What a
    stage needs comes from the stages' declared UPSTREAM (with ``purifier.activations_source: recompute`` the
    purifier does not need the activations stage, which for WRN-28-10 would write terabytes). Returns the
    outputs of every stage for 'all', else ``[output]``."""
    targets = needed(ctx, "evaluate") if stage == "all" else [stage] if only else needed(ctx, stage)
    upstream = [s for s in targets[:-1] if not ctx.output_or_none(s, complete=True)]
    preflight.check(ctx, [s for s in targets if s == stage or s in upstream or stage == "all"])
    if stage == "all":
        for s in STAGES:
            if s not in targets and s not in stages.SIDE:
                ctx.log(f"[{s}] skipped: no stage needs it (purifier.activations_source is "
                        f"'{ctx.cfg.purifier.activations_source}')")
    if stage != "all" and not only and upstream:
        ctx.log(f"[pipeline] --stage {stage} needs {', '.join(upstream)} first: running them (--only skips this)")
    outs, ran = [], False
    try:
        for s in targets:
            ran = ran or ctx.output_or_none(s, complete=True) is None
            outs.append(run_stage(ctx, s, rebuild=rebuild and (stage == "all" or s == stage)))
    finally:
        if ran and not ctx.verbose and (ctx.saved_logs or ctx.ray_ready):
            where = ctx.saved_logs or save_logs(ctx.store.root / "logs")
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
        if _predates_specs(out):  # never a cache hit (its key is not any spec's hash); not corrupt either
            lines.append(f"old {out.stage:<12} {out.dir} (stale: written before specs; a run recomputes it under "
                         f"a new key)")
            continue
        if fix:  # before hashing, so each file is hashed once
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


def _predates_specs(out: Output) -> bool:
    try:
        return "spec" not in out.manifest()
    except Exception:  # noqa: BLE001 - an unreadable manifest is verify_output's to report
        return False


def store_root(path: str | Path) -> Store:
    return Store(Path(path))
