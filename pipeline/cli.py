"""The ``pipeline`` command: parses options and dispatches to pipeline.runner. No logic lives here."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from . import runner
from .config import ConfigError, load_config

STAGE_NAMES = list(runner.STAGES) + ["all"]

EXIT_CONFIG = 2  # invalid config, override or config path
EXIT_FAILED = 1  # a stage failed (bad data, bad checkpoint, corrupt store, ...)


def _fail(msg: str, code: int) -> None:
    click.echo(f"error: {msg}", err=True)
    sys.exit(code)


def _context(config: str, overrides: tuple[str, ...], store: str, ray_address: str | None,
             workers: int | None = None, verbose: bool = False) -> runner.Context:
    try:
        cfg = load_config(config, overrides)
    except ConfigError as exc:
        _fail(str(exc), EXIT_CONFIG)
    return runner.Context(cfg=cfg, store=runner.store_root(store), ray_address=ray_address, workers=workers,
                          verbose=verbose)


def _dispatch(fn, *args, **kwargs):
    """Call into the runner: user-facing errors (bad data, checkpoint, store file) become one line and exit 1,
    Ctrl-C says how to resume, anything else is a bug and keeps its traceback."""
    try:
        return fn(*args, **kwargs)
    except KeyboardInterrupt:
        _fail("interrupted; run the same command again to resume", 130)
    except Exception as exc:  # noqa: BLE001
        msg = runner.user_error(exc)
        if msg is None:
            raise
        _fail(msg, EXIT_FAILED)


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
workers_option = click.option("--workers", type=click.IntRange(min=1), default=None, metavar="N",
                              help="Model workers per stage (Ray actors / Train workers / evaluation tasks). "
                                   "Default: one per GPU, or 1 on CPU. Never changes results or store keys.")


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
@set_option
@store_option
@ray_option
@workers_option
@verbose_option
def run(config, stage, only, overrides, store, ray_address, workers, verbose):
    """Run a stage (and what it needs) or all, for a config; finished outputs are reused, partial ones resumed."""
    _dispatch(runner.run, _context(config, overrides, store, ray_address, workers, verbose), stage, only)


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
@set_option
@store_option
@ray_option
@workers_option
@verbose_option
def sweep(config, grid_items, grid_file, overrides, store, ray_address, workers, verbose):
    """Run every combination of a grid of (downstream) settings, reusing cached upstream outputs, and write
    one comparison table (markdown and CSV)."""
    from .sweep import parse_grid, run_sweep, validate

    try:
        grid = parse_grid(grid_items, grid_file)
        validate(config, overrides, grid)
    except ConfigError as exc:
        _fail(str(exc), EXIT_CONFIG)
    _dispatch(run_sweep, config, overrides, grid, runner.store_root(store), ray_address, workers, verbose=verbose)


@main.command()
@config_option
@set_option
@store_option
def plan(config, overrides, store):
    """Before launching anything: the stage graph with cache status, the work and the bytes of each stage."""
    from .plan import plan_lines

    lines = _dispatch(plan_lines, _context(config, overrides, store, None))
    click.echo("\n".join(lines))


@main.command()
@click.option("--config", "-c", "config", default=None, metavar="FILE",
              help="Verify only the outputs of this config (default: every output in the store).")
@set_option
@store_option
def verify(config, overrides, store):
    """Check every stored file against its manifest (size and sha256); exit 1 naming each bad file."""
    from .store import verify_output

    if not Path(store).is_dir():
        _fail(f"{store}: no store there (not a directory); pass the store with --store", EXIT_FAILED)
    if config:
        ctx = _context(config, overrides, store, None)
        outputs = []
        for s in runner.STAGES:
            try:
                out = ctx.output(s)
            except runner.UpstreamMissing:
                continue
            if out.is_complete():
                outputs.append(out)
    else:
        outputs = runner.store_root(store).all_outputs()
    problems = []
    for out in outputs:
        found = verify_output(out)
        problems += found
        click.echo(f"{'ok ' if not found else 'BAD'} {out.stage:<12} {out.dir}")
    for p in problems:
        click.echo(f"error: {p}", err=True)
    click.echo(f"{len(outputs)} output(s) checked, {len(problems)} problem(s)")
    sys.exit(EXIT_FAILED if problems else 0)


if __name__ == "__main__":  # pragma: no cover
    main()
