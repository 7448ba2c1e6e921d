"""`pipeline sweep`: every combination of a grid of settings, each run through the whole stage graph (so
unchanged upstream stages are cache hits), and one comparison table (markdown + CSV) across the runs."""
from __future__ import annotations

import csv
import io
import itertools
import json
from pathlib import Path

import yaml

from .config import ConfigError, fingerprint, load_config, parse_override
from .log import echo
from .store import atomic_write_bytes, atomic_write_json

COLUMNS = ["AT/Cl", "C/Cl", "AT/AA", "C/randAA", "C/randAA fresh mean", "C/randAA fresh worst", "PGD+EOT fresh mean"]


def split_values(text: str) -> list[str]:
    """Split ``v1,v2,[a,b]`` on commas outside brackets."""
    out, depth, cur = [], 0, ""
    for ch in text:
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
            continue
        depth += ch in "[{"
        depth -= ch in "]}"
        cur += ch
    out.append(cur)
    return [v.strip() for v in out if v.strip()]


def parse_grid(items: tuple[str, ...], grid_file: str | None) -> dict[str, list]:
    grid: dict[str, list] = {}
    if grid_file:
        p = Path(grid_file)
        if not p.is_file():
            raise ConfigError(str(p), "", "grid file not found")
        raw = yaml.safe_load(p.read_text()) or {}
        if not isinstance(raw, dict) or not isinstance(raw.get("grid"), dict):
            raise ConfigError(str(p), "grid", "expected a mapping 'grid: {key: [values, ...]}'")
        for k, vs in raw["grid"].items():
            if not isinstance(vs, list) or not vs:
                raise ConfigError(str(p), f"grid.{k}", "expected a non-empty list of values")
            grid[k] = vs
    for item in items:
        key, _ = parse_override(item)
        grid[key] = [yaml.safe_load(v) for v in split_values(item.partition("=")[2])]
    if not grid:
        raise ConfigError("--grid", "", "give at least one --grid key=v1,v2 or --grid-file")
    return grid


def _override(key: str, value) -> str:
    return f"{key}={json.dumps(value)}"


def combinations(grid: dict[str, list]) -> list[dict]:
    keys = list(grid)
    return [dict(zip(keys, vals)) for vals in itertools.product(*(grid[k] for k in keys))]


def validate(config: str, overrides: tuple[str, ...], grid: dict[str, list]) -> list:
    """Every combination's config, validated before anything runs."""
    return [load_config(config, [*overrides, *(_override(k, v) for k, v in combo.items())])
            for combo in combinations(grid)]


def run_sweep(config: str, overrides: tuple[str, ...], grid: dict[str, list], store, ray_address=None,
              workers=None, log=echo) -> Path:
    from . import runner

    cfgs = validate(config, overrides, grid)
    combos = combinations(grid)
    rows = []
    for i, (combo, cfg) in enumerate(zip(combos, cfgs), 1):
        log(f"[sweep] run {i}/{len(combos)}: " + ", ".join(f"{k}={json.dumps(v)}" for k, v in combo.items()))
        ctx = runner.Context(cfg=cfg, store=store, ray_address=ray_address, workers=workers, log=log)
        outs = {o.stage: o for o in runner.run(ctx, "all")}
        res = json.loads((outs["evaluate"].dir / "results.json").read_text())
        rows.append({"combo": combo, "summary": res["summary"], "reduced_strength": res["reduced_strength"],
                     "points": res["points"], "keys": {s: o.key for s, o in outs.items()}})
    sweep_dir = store.root / cfgs[0].data.dataset / "sweeps" / fingerprint(config, list(overrides), grid)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(sweep_dir / "sweep.json", {"config": config, "overrides": list(overrides), "grid": grid,
                                                  "runs": rows})
    atomic_write_bytes(sweep_dir / "comparison.csv", _csv(grid, rows).encode())
    md = _markdown(grid, rows)
    if list(grid) == ["eval.eps"]:
        eps_figure(rows, sweep_dir / "robust_accuracy_vs_eps.png")
        md += "\n![robust accuracy against eps](robust_accuracy_vs_eps.png)\n"
    atomic_write_bytes(sweep_dir / "comparison.md", md.encode())
    log(f"[sweep] {len(rows)} run(s); comparison: {sweep_dir / 'comparison.md'}")
    return sweep_dir


def _cell(value) -> str:
    """A grid value as a table cell: strings as they are, anything else (numbers, lists) as JSON."""
    return value if isinstance(value, str) else json.dumps(value)


def _csv(grid: dict, rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow([*grid, *COLUMNS, "points", "reduced_strength", "evaluate_key"])
    for r in rows:
        w.writerow([_cell(r["combo"][k]) for k in grid] + [f"{r['summary'][c]:.4f}" for c in COLUMNS]
                   + [r["points"], r["reduced_strength"], r["keys"]["evaluate"]])
    return buf.getvalue()


def _markdown(grid: dict, rows: list[dict]) -> str:
    head = [*grid, *COLUMNS, "points"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        cells = [f"`{_cell(r['combo'][k])}`" for k in grid] + [f"{100 * r['summary'][c]:.2f}%" for c in COLUMNS]
        lines.append("| " + " | ".join(cells + [str(r["points"])]) + " |")
    note = ("**REDUCED STRENGTH** in at least one run: see each run's report.md for its settings.\n\n"
            if any(r["reduced_strength"] for r in rows) else "")
    return "# Sweep comparison\n\n" + note + "\n".join(lines) + "\n"


def eps_figure(rows: list[dict], png: Path) -> None:
    """Robust accuracy against eps: the classifier alone (standard AutoAttack) and CARSO (randAA, as the runner
    scores it and re-scored on fresh draws; PGD+EOT)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = sorted((r["combo"]["eval.eps"], r["summary"], r["reduced_strength"]) for r in rows)
    eps = [p[0] for p in pts]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for key, label, style in (("AT/AA", "classifier alone, AutoAttack", "o-"),
                              ("C/randAA", "CARSO, randAA (runner)", "s-"),
                              ("C/randAA fresh mean", "CARSO, randAA (fresh draws)", "s--"),
                              ("PGD+EOT fresh mean", "CARSO, PGD+EOT", "^:")):
        ax.plot(eps, [100 * p[1][key] for p in pts], style, label=label)
    ax.set_xlabel("L-inf eps")
    ax.set_ylabel("robust accuracy (%)")
    title = "robust accuracy against eps"
    ax.set_title(title + (" (REDUCED STRENGTH)" if any(p[2] for p in pts) else ""), fontsize=9)
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = png.with_name(".tmp-" + png.name)
    fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    tmp.replace(png)
