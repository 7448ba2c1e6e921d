"""The ``pipeline`` command: parses options and dispatches to pipeline.runner. No logic lives here."""
from __future__ import annotations

import sys

import click

from . import runner
from .config import load_config
from .errors import EXIT_FAILED, find_user_error, one_line
from .plan import plan_lines
from .sweep import parse_grid, run_sweep, validate

STAGE_NAMES = list(runner.STAGES) + ["all"]


def _fail(msg: str, code: int) -> None:
    click.echo(f"error: {msg}", err=True)
    sys.exit(code)


def _context(config: str, overrides: tuple[str, ...], store: str, ray_address: str | None,
             workers: int | None = None, verbose: bool = False) -> runner.Context:
    cfg = _dispatch(load_config, config, overrides)
    return runner.Context(cfg=cfg, store=runner.store_root(store), ray_address=ray_address, workers=workers,
                          verbose=verbose)


def _dispatch(fn, *args, **kwargs):
    """Call into the library: a UserError anywhere in the exception's chain (also from inside Ray) becomes one
    line and its exit code (2 configuration, 1 data/store), Ctrl-C says how to resume, anything else is a bug
    and keeps its traceback."""
    try:
        return fn(*args, **kwargs)
    except KeyboardInterrupt:
        _fail("interrupted; run the same command again to resume", 130)
    except Exception as exc:  # noqa: BLE001
        err = find_user_error(exc)
        if err is None:
            raise
        _fail(one_line(err), err.exit_code)


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
                                   "Default: one per GPU; on CPU one actor using every core (attacks, activations), "
                                   "purifier.workers (purifier), one task per core (evaluate). Never changes results "
                                   "or store keys.")


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
@verbose_option
def run(config, stage, only, rebuild, overrides, store, ray_address, workers, verbose):
    """Run a stage (and what it needs) or all, for a config; finished outputs are reused, partial ones resumed."""
    _dispatch(runner.run, _context(config, overrides, store, ray_address, workers, verbose), stage, only, rebuild)


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
    grid = _dispatch(parse_grid, grid_items, grid_file)
    _dispatch(validate, config, overrides, grid)
    _dispatch(run_sweep, config, overrides, grid, runner.store_root(store), ray_address, workers, verbose=verbose)


@main.command()
@config_option
@set_option
@store_option
@click.option("--tflops", type=click.FloatRange(min=0, min_open=True), default=20.0, show_default=True,
              help="Sustained TFLOP/s of one device, for the projected hours (20: a rough figure for one A100 on "
                   "these convnets in TF32; about 0.07 on this project's 2-core CI machine).")
@click.option("--devices", type=click.IntRange(min=1), default=1, show_default=True,
              help="Devices working at once, for the projected hours.")
def plan(config, overrides, store, tflops, devices):
    """Before launching anything: the stage graph with cache status, the work, FLOPs, projected hours and the
    bytes of each stage."""
    lines = _dispatch(plan_lines, _context(config, overrides, store, None), tflops, devices)
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
