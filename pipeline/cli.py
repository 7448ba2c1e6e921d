"""The ``pipeline`` command: parses options and dispatches to pipeline.runner. No logic lives here beyond the
way out: a user error, Ctrl-C or SIGTERM is one line and an exit code."""
from __future__ import annotations

import os
import signal
import sys
import threading
import time

import click

from . import preflight, runner
from .config import load_config
from .errors import EXIT_FAILED, EXIT_TERMINATED, DiskFull, find_user_error, lost_to_ray, one_line, out_of_memory
from .plan import full_disk_line, plan_lines, stopped
from .sweep import parse_grid, run_sweep, validate

STAGE_NAMES = list(runner.STAGES) + ["all"]


def _fail(msg: str, code: int) -> None:
    click.echo(f"error: {msg}", err=True)
    if code in (EXIT_INTERRUPTED, EXIT_TERMINATED):
        _quiet_console()
    sys.exit(code)


def _quiet_console() -> None:
    """After the last line of an interrupted run, nothing else reaches the console: Ray's core worker keeps logging
    from its C++ threads while the interpreter shuts it down (``task_manager.cc: Failed to push error to driver``,
    its signal stack dumps); those lines say nothing the user can act on (Ray's log files keep them)."""
    sys.stderr.flush()
    sys.stdout.flush()
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.dup2(null, 2)


def _context(config: str, overrides: tuple[str, ...], store: str, ray_address: str | None,
             workers: int | None = None, verbose: bool = False) -> runner.Context:
    cfg = _dispatch(load_config, config, overrides)
    return runner.Context(cfg=cfg, store=runner.store_root(store), ray_address=ray_address, workers=workers,
                          verbose=verbose)


class Terminated(KeyboardInterrupt):
    """SIGTERM on the driver (``ray job stop``, a batch scheduler, a container runtime), raised on the main thread
    like Ctrl-C's KeyboardInterrupt so that the same way out runs: the stage's ``finally`` blocks, the output's
    lock released, Ray shut down (its atexit hook stops a local instance's processes; on a cluster the job's
    tasks and actors end with the driver, the cluster stays). A KeyboardInterrupt (Ray turns a signal raised
    inside ``ray.get`` into a plain one) is told apart by ``_SIGTERM``."""


_SIGTERM = {"received": False}
EXIT_INTERRUPTED = 130  # Ctrl-C (SIGINT)


def _on_sigterm(signum, frame):
    if _SIGTERM["received"]:
        return  # a second SIGTERM (a scheduler's reminder) while the first one's way out runs: let it finish
    _SIGTERM["received"] = True
    raise Terminated()


SIGTERM_GRACE_S = 3.0  # how long a lost Ray worker or node waits for a SIGTERM that may be on its way


def _sigterm_on_its_way(exc: BaseException) -> bool:
    """Whether ``exc`` (no SIGTERM seen yet) is the first sign of a SIGTERM to the whole process group, or to the
    whole job (``ray job stop``, a batch scheduler's cgroup): Ray's workers and raylet get it too, and on a busy
    machine one of them can die, and the driver's ``ray.get`` raise its loss (an actor died, objects lost), before
    the driver's own thread that received the signal has run its handler. So a loss to Ray waits up to
    ``SIGTERM_GRACE_S`` for that handler; anything else (a bug, a user error) is answered at once."""
    if not lost_to_ray(exc):
        return False
    deadline = time.monotonic() + SIGTERM_GRACE_S
    try:
        while not _SIGTERM["received"] and time.monotonic() < deadline:
            time.sleep(0.05)
    except Terminated:
        pass
    return _SIGTERM["received"]


def _arm_sigterm() -> None:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)


def _catch_sigterm() -> None:
    """SIGTERM -> ``Terminated`` for this command (run, sweep). ``ray.init`` replaces the handler twice: with its
    own Python handlers (``sys.exit``) and, in the driver's core worker, with Ray's native failure-signal handler,
    which prints its stack dump (``*** SIGTERM received ...``, ``PC: @ ...``) to the console. So the handler is
    installed again right after every ``ray.init`` of this process, through Ray's post-init hooks (the list Ray's
    own libraries register with; were it gone, SIGTERM would still stop the run, with Ray's dump and exit code).
    Ray's other processes keep Ray's handler; a local instance's run outside the driver's process group
    (``cluster.connect``), so a SIGTERM to that group reaches the driver alone. One sent to every process of the
    job (a scheduler's cgroup, a cluster's nodes) puts their dumps in Ray's log files, copied into
    <store>/logs/."""
    _arm_sigterm()
    try:
        from ray._private import worker
        hooks = worker._post_init_hooks
    except (ImportError, AttributeError):  # pragma: no cover - a Ray without the hook list
        return
    if _arm_sigterm not in hooks:
        hooks.append(_arm_sigterm)


def _dispatch(fn, *args, job: tuple | None = None, **kwargs):
    """Call into the library: a UserError anywhere in the exception's chain (also from inside Ray) becomes one
    line and its exit code (2 configuration or a store too small for the plan, 1 data/store or a full disk),
    Ctrl-C (130) and SIGTERM (143) say what was finished and how to resume, anything else is a bug and keeps its
    traceback. ``job``: ``(ctx, stage, only)`` of ``pipeline run``, for what was finished and what a full disk's
    stage still needs."""
    resume = "run the same command again to resume"
    try:
        return fn(*args, **kwargs)
    except KeyboardInterrupt:
        what = f"; {stopped(*job)}" if job else ""
        if _SIGTERM["received"]:
            _fail(f"terminated (SIGTERM){what}; {resume}", EXIT_TERMINATED)
        _fail(f"interrupted{what}; {resume}", EXIT_INTERRUPTED)
    except SystemExit as exc:
        # Ray's own driver handler, ``sys.exit(SIGTERM)``, where the post-init hooks do not run (ray:// client mode)
        if exc.code != signal.SIGTERM:
            raise
        _fail(f"terminated (SIGTERM){f'; {stopped(*job)}' if job else ''}; {resume}", EXIT_TERMINATED)
    except Exception as exc:  # noqa: BLE001
        if _SIGTERM["received"] or _sigterm_on_its_way(exc):  # the signal's way out (Ray's workers stopped too)
            _fail(f"terminated (SIGTERM){f'; {stopped(*job)}' if job else ''}; {resume}", EXIT_TERMINATED)
        err = find_user_error(exc)
        if err is None and (memory := out_of_memory(exc)) is not None:
            where = f"the {job[1]} stage's" if job else "its"
            _fail(f"out of memory: Ray stopped {where} worker(s), the node running low on memory"
                  f"{f' ({memory})' if memory else ''}; {stopped(*job) + '; ' if job else ''}run fewer workers per node "
                  f"(--set purifier.workers=N for the purifier, --workers N for the other stages) or give it more "
                  f"memory, then {resume}", EXIT_FAILED)
        if err is None:
            raise
        if isinstance(err, DiskFull):
            msg = full_disk_line(*job, err) if job else f"{one_line(err)}; free space and {resume}"
        else:
            msg = one_line(err)
        _fail(msg, err.exit_code)


config_option = click.option("--config", "-c", "config", required=True, metavar="FILE",
                             help="YAML run config, e.g. configs/fmnist.yaml (the default scenario).")
set_option = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                          help="Override one config key, e.g. --set attack.eps=0.05 (repeatable; same validation "
                               "as the file).")
store_option = click.option("--store", default="./runs", show_default=True, metavar="DIR",
                            help="Root of the content-addressed store (on a cluster: a path every node sees).")
ray_option = click.option("--ray-address", default=None, metavar="ADDR",
                          help="Ray cluster to join: 'auto' or ray://host:port. Default: start a local Ray instance.")
verbose_option = click.option("--verbose", "-v", is_flag=True, default=False,
                              help="Also print Ray's own output (workers, Ray Train); by default it goes to Ray's "
                                   "log files, copied into <store>/logs/.")
space_option = click.option("--no-space-check", "no_space_check", is_flag=True, default=False,
                            help="Start even when the free space under --store is less than the stages about to run "
                                 "write (`pipeline plan` shows both; activations at an estimated compression "
                                 "ratio). Without it such a run stops before any work (exit 2).")
workers_option = click.option("--workers", type=click.IntRange(min=1), default=None, metavar="N",
                              help="Model workers of the stages whose results do not depend on it (attacks and "
                                   "activations actors, evaluation and probe tasks). Default: one per GPU; on CPU one "
                                   "actor using every core (attacks, activations), one task per core (evaluate). Never "
                                   "changes results or store keys. The purifier's Ray Train workers are "
                                   "purifier.workers (a config key, in its store key: the count changes the weights).")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="carso-pipeline")
def main() -> None:
    """CARSO as a distributed pipeline: adversarially-trained classifier + representation-conditional purifier.

    \b
    Stages (each cached in the store under a hash of everything that determines it):
      classifier   adversarially train (PGD) or load the frozen classifier
      attacks      FGSM eps/2, FGSM eps, PGD eps/2, PGD eps + clean examples -> WebDataset shards
      activations  hooked classifier activations of those examples -> Zarr arrays
      purifier     fit the conditional-VAE purifier on Ray Train
      evaluate     CARSO robust aggregation; AutoAttack / randomised AutoAttack / PGD+EOT
      all          every stage above, in order
    """


@main.command()
@config_option
@click.option("--stage", "-s", required=True, type=click.Choice(STAGE_NAMES),
              help="Stage to run, after any upstream stage it needs that is not finished; or 'all'.")
@click.option("--only", is_flag=True, default=False,
              help="Run just --stage: fail instead of running missing upstream stages (cluster jobs).")
@click.option("--rebuild", is_flag=True, default=False,
              help="Delete --stage's output and compute it again (every stage's with 'all'), e.g. after "
                   "`pipeline verify` reported it corrupt. Upstream outputs are kept.")
@set_option
@store_option
@ray_option
@workers_option
@space_option
@verbose_option
def run(config, stage, only, rebuild, overrides, store, ray_address, workers, no_space_check, verbose):
    """Run a stage (and what it needs) or all, for a config; finished outputs are reused, partial ones resumed.

    \b
    Exit codes: 0 done; 1 bad data, a bad store file, a full disk or a node out of memory;
    2 a bad config, or a store too small for the stages about to run
    (--no-space-check); 130 Ctrl-C; 143 SIGTERM. After 1, 130 or 143
    the same command resumes from the finished units."""
    _catch_sigterm()
    preflight.SPACE_CHECK = not no_space_check
    ctx = _context(config, overrides, store, ray_address, workers, verbose)
    _dispatch(runner.run, ctx, stage, only, rebuild, job=(ctx, stage, only))


@main.command()
@config_option
@set_option
@store_option
def status(config, overrides, store):
    """Show what exists in the store for a config (complete, partial, missing)."""
    rows = _dispatch(runner.status, _context(config, overrides, store, None))
    width = max(len(r[0]) for r in rows)
    for stage, state, where in rows:
        click.echo(f"{stage:<{width}}  {state:<22}  {where}")


@main.command()
@config_option
@click.option("--grid", "grid_items", multiple=True, metavar="KEY=V1,V2",
              help="A setting and its values, e.g. --grid eval.aggregation=robust,logit,prob or "
                   "--grid 'purifier.layers=[conv1],[conv2,conv3]' (repeatable; every combination runs).")
@click.option("--grid-file", default=None, metavar="FILE",
              help="YAML file with 'grid: {key: [values]}', e.g. configs/ablations/fmnist.yaml.")
@click.option("--stage", "-s", "stage", type=click.Choice(["all", "probes"]), default="all", show_default=True,
              help="What each combination runs: the whole job up to evaluate ('all'), or the probes stage (a table "
                   "of every combination's layers).")
@set_option
@store_option
@ray_option
@workers_option
@space_option
@verbose_option
def sweep(config, grid_items, grid_file, stage, overrides, store, ray_address, workers, no_space_check, verbose):
    """Run every combination of a grid of (downstream) settings, reusing cached upstream outputs, and write
    one comparison table (markdown and CSV)."""
    _catch_sigterm()
    preflight.SPACE_CHECK = not no_space_check
    grid = _dispatch(parse_grid, grid_items, grid_file)
    _dispatch(validate, config, overrides, grid)
    _dispatch(run_sweep, config, overrides, grid, runner.store_root(store), ray_address, workers, verbose=verbose,
              stage=stage)


@main.command()
@config_option
@set_option
@store_option
@click.option("--tflops", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Sustained TFLOP/s of one device, for the projected hours (default 20: a rough figure for one A100 "
                   "on these convnets in TF32; about 0.07 on this project's 2-core CI machine). Not with --calibrate.")
@click.option("--devices", type=click.IntRange(min=1), default=None,
              help="Devices working at once, for the projected hours (default 1). Not with --calibrate.")
@click.option("--calibrate", is_flag=True, default=False,
              help="Time each stage's unit of work on this machine (CUDA when present, else the CPU at the threads a "
                   "stage worker gets) and project every stage's hours from those measured rates instead of "
                   "--tflops; prints the rates it used.")
@click.option("--calibrate-seconds", type=float, default=None, metavar="S",
              help="With --calibrate: seconds each unit is timed for, after a warm-up (default 2).")
def plan(config, overrides, store, tflops, devices, calibrate, calibrate_seconds):
    """Before launching anything: the stage graph with cache status, the work, FLOPs, projected hours and the
    bytes of each stage."""
    lines = _dispatch(plan_lines, _context(config, overrides, store, None), tflops, devices, calibrate,
                      calibrate_seconds)
    click.echo("\n".join(lines))


@main.command()
@click.option("--config", "-c", "config", default=None, metavar="FILE",
              help="Verify only the outputs of this config (default: every output in the store).")
@click.option("--fix", is_flag=True, default=False,
              help="Also remove what is safe to remove: leftover temporaries and empty key folders (a corrupt "
                   "output is rebuilt with `pipeline run ... --rebuild`).")
@set_option
@store_option
def verify(config, fix, overrides, store):
    """Check every stored file against its manifest (size and sha256), and report files no manifest lists and
    empty key folders; exit 1 naming each problem."""
    ctx = _context(config, overrides, store, None) if config else None
    report = _dispatch(runner.verify, runner.store_root(store), ctx, fix)
    for line in report.lines:
        click.echo(line)
    for p in report.problems:
        click.echo(f"error: {p}", err=True)
    click.echo(report.summary)
    sys.exit(EXIT_FAILED if report.problems else 0)


if __name__ == "__main__":  # pragma: no cover
    main()
