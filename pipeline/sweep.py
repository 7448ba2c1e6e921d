"""`pipeline sweep`: every combination of a grid of settings, each run through the whole stage graph (so
unchanged upstream stages are cache hits), and one comparison table (markdown + CSV) across the runs."""
from __future__ import annotations

import csv
import io
import itertools
import json
import time
from pathlib import Path

import yaml

from . import runner
from .config import ConfigError, fingerprint, load_config, parse_override, read_yaml
from .evaluation import CARSO_ATTACKS
from .log import echo
from .store import atomic_file, atomic_write_bytes, atomic_write_json

def columns(rows: list[dict]) -> list[str]:
    """The summary columns of a sweep: AT/Cl, C/Cl, AT/AA, then from ``CARSO_ATTACKS`` in order the headline attack's
    runner score, fresh mean and fresh worst, and every other robustness number's fresh mean; a column appears
    when any row has it (a row without it leaves its cell blank)."""
    wanted = ["AT/Cl", "C/Cl", "AT/AA"]
    for a in CARSO_ATTACKS:
        if a.label:
            wanted += [a.label, f"{a.label} fresh mean", f"{a.label} fresh worst"] if a.runner else [f"{a.label} fresh mean"]
    return [c for c in wanted if any(c in r["summary"] for r in rows)]


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
        raw = read_yaml(p, "grid file") or {}
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
              workers=None, log=echo, verbose: bool = False, stage: str = "all") -> Path:
    """Every combination through the whole job (``stage='all'``: one row per combination) or through the probes
    stage (``stage='probes'``: one row per combination and probed layer)."""
    cfgs = validate(config, overrides, grid)
    combos = combinations(grid)
    if stage == "probes":
        return _probe_sweep(config, overrides, grid, combos, cfgs, store, ray_address, workers, log, verbose)
    rows = []
    for i, (combo, cfg) in enumerate(zip(combos, cfgs), 1):
        log(f"[sweep] run {i}/{len(combos)}: " + ", ".join(f"{k}={json.dumps(v)}" for k, v in combo.items()))
        ctx = runner.Context(cfg=cfg, store=store, ray_address=ray_address, workers=workers, log=log,
                             verbose=verbose)
        t0 = time.perf_counter()
        outs = {o.stage: o for o in runner.run(ctx, "all")}
        wall = time.perf_counter() - t0
        res = json.loads((outs["evaluate"].dir / "results.json").read_text())
        rows.append({"combo": combo, "summary": res["summary"], "reduced_strength": res["reduced_strength"],
                     "points": res["points"], "keys": {s: o.key for s, o in outs.items()}, "extra": _extra(res, outs),
                     "wall_s": wall, "intervals_95": res["intervals_95"], "eps": res["eps"],
                     "randaa_settings": res["carso_randaa"].get("settings", {})})
    sweep_dir = store.root / cfgs[0].data.dataset / "sweeps" / fingerprint(config, list(overrides), grid)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(sweep_dir / "sweep.json", {"config": config, "overrides": list(overrides), "grid": grid,
                                                  "runs": rows})
    atomic_write_bytes(sweep_dir / "comparison.csv", _csv(grid, rows).encode())
    md = _markdown(grid, rows)
    if list(grid) == ["eval.eps"]:
        eps_figure(rows, sweep_dir / "robust_accuracy_vs_eps.png")
        md += "\n![robust accuracy against eps](robust_accuracy_vs_eps.png)\n"
    comparison_figure(figure_rows(grid, rows), sweep_dir / "comparison.png",
                      figure_title(f"{cfgs[0].data.dataset} sweep", rows))
    md += "\n![AT/AA and C/randAA per run, 95% Wilson intervals](comparison.png)\n"
    atomic_write_bytes(sweep_dir / "comparison.md", md.encode())
    log(f"[sweep] {len(rows)} run(s); comparison: {sweep_dir / 'comparison.md'}")
    return sweep_dir


PROBE_COLUMNS = [("transfer_probe", "clean"), ("transfer_probe", "transfer"), ("transfer_probe", "adaptive"),
                 ("robust_probe", "clean"), ("robust_probe", "transfer"), ("robust_probe", "adaptive")]


def _probe_sweep(config, overrides, grid, combos, cfgs, store, ray_address, workers, log, verbose) -> Path:
    """The probes stage for every combination; comparison.md / .csv: one line per (combination, layer) with both
    probe kinds' clean, transfer and adaptive accuracy and the classifier's own clean and PGD accuracy."""
    runs = []
    for i, (combo, cfg) in enumerate(zip(combos, cfgs), 1):
        log(f"[sweep] run {i}/{len(combos)} (probes): " + ", ".join(f"{k}={json.dumps(v)}" for k, v in combo.items()))
        ctx = runner.Context(cfg=cfg, store=store, ray_address=ray_address, workers=workers, log=log,
                             verbose=verbose)
        out = runner.run(ctx, "probes")[0]
        runs.append({"combo": combo, "key": out.key, "probes": json.loads((out.dir / "probes.json").read_text())})
    sweep_dir = store.root / cfgs[0].data.dataset / "sweeps" / fingerprint(config, list(overrides), grid, "probes")
    sweep_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(sweep_dir / "sweep.json", {"config": config, "overrides": list(overrides), "grid": grid,
                                                  "stage": "probes", "runs": runs})
    head = [*grid, "layer", *(f"{k.split('_')[0]} {c}" for k, c in PROBE_COLUMNS), "classifier clean",
            "classifier PGD", "probes_key"]
    table = []
    for r in runs:
        p = r["probes"]
        for row in p["layers"]:
            table.append([_cell(r["combo"][k]) for k in grid] + [row["layer"]]
                         + [row[k][c] if k in row else None for k, c in PROBE_COLUMNS]
                         + [p["classifier"]["clean"], p["classifier"]["pgd"], r["key"]])
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(head)
    for line in table:
        w.writerow(["" if v is None else f"{v:.4f}" if isinstance(v, float) else v for v in line])
    atomic_write_bytes(sweep_dir / "comparison.csv", buf.getvalue().encode())
    s = runs[0]["probes"]["settings"]
    md = ["# Probe sweep comparison", "",
          f"Every attack: PGD {s['scoring_attack']['steps']} x {s['scoring_attack']['step_size']:g}, L-inf eps "
          f"{s['eps']:g}, on test points {s['points'][0]}-{s['points'][1] - 1}; transfer: crafted against the "
          "classifier alone; adaptive: against the probe itself through the frozen layers (the first run's "
          "settings; each run's report.md has its own, with its probe training settings).", "",
          "| " + " | ".join(head[:-1]) + " |", "|" + " --- |" * (len(head) - 1)]
    for line in table:
        md.append("| " + " | ".join(f"{100 * v:.1f}%" if isinstance(v, float) else "" if v is None else str(v)
                                    for v in line[:-1]) + " |")
    atomic_write_bytes(sweep_dir / "comparison.md", ("\n".join(md) + "\n").encode())
    log(f"[sweep] {len(runs)} probe run(s); comparison: {sweep_dir / 'comparison.md'}")
    return sweep_dir


def _cell(value) -> str:
    """A grid value as a table cell: strings as they are, anything else (numbers, lists) as JSON."""
    return value if isinstance(value, str) else json.dumps(value)


def _extra(res: dict, outs: dict) -> dict:
    """The study columns beyond the summary: the gap, its intervals, the diagnostics and the compute each row cost
    (stage times from the manifests, so a cache hit still shows what its output took to make)."""
    d = res["diagnostics"]
    tr = d.get("training") or {}
    times = {s: o.manifest().get("timings", {}).get("total_s") for s, o in outs.items()}
    lo, hi = res["intervals_95"]["C/randAA fresh mean"]
    alo, ahi = res["intervals_95"]["AT/AA"]
    return {"C - AT (points)": 100 * res["carso_minus_classifier"],
            "C/randAA 95% CI": f"{100 * lo:.1f}-{100 * hi:.1f}", "AT/AA 95% CI": f"{100 * alo:.1f}-{100 * ahi:.1f}",
            "purified (C on PGD vs classifier)": d["purification"]["carso"]["mean"],
            "classifier on PGD": d["purification"]["classifier"],
            "disagree": d["stochasticity"]["disagreement_share"], "pixel std": d["stochasticity"]["mean_pixel_std"],
            "KL": tr.get("final_kl"), "active units": f"{tr.get('active_units')}/{tr.get('latent_dims')}",
            "purifier s": times.get("purifier"), "evaluate s": times.get("evaluate")}


EXTRA = ["C - AT (points)", "C/randAA 95% CI", "AT/AA 95% CI", "classifier on PGD", "purified (C on PGD vs classifier)",
         "disagree", "pixel std", "KL", "active units", "purifier s", "evaluate s"]
PCT = {"classifier on PGD", "purified (C on PGD vs classifier)", "disagree"}


def _fmt(name: str, v, pct_sign: bool = True) -> str:
    if v is None:
        return ""
    if name in PCT:
        return f"{100 * v:.2f}%" if pct_sign else f"{v:.4f}"
    if name == "C - AT (points)":
        return f"{v:+.2f}"
    if name in ("pixel std", "KL"):
        return f"{v:.4f}" if name == "pixel std" else f"{v:.3f}"
    if name.endswith(" s"):
        return f"{v:.0f}"
    return str(v)


def _num(v, fmt: str) -> str:
    return "" if v is None else fmt.format(v)


def _csv(grid: dict, rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    cols = columns(rows)
    w.writerow([*grid, *cols, *EXTRA, "points", "row wall s", "reduced_strength", "evaluate_key"])
    for r in rows:
        w.writerow([_cell(r["combo"][k]) for k in grid] + [_num(r["summary"].get(c), "{:.4f}") for c in cols]
                   + [_fmt(c, r["extra"].get(c), pct_sign=False) for c in EXTRA]
                   + [r["points"], f"{r['wall_s']:.0f}", r["reduced_strength"], r["keys"]["evaluate"]])
    return buf.getvalue()


def _markdown(grid: dict, rows: list[dict]) -> str:
    cols = columns(rows)
    head = [*grid, *cols, *EXTRA, "points", "row wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        cells = [f"`{_cell(r['combo'][k])}`" for k in grid] + [_num(r["summary"].get(c), "{:.2%}") for c in cols]
        cells += [_fmt(c, r["extra"].get(c)) for c in EXTRA]
        lines.append("| " + " | ".join(cells + [str(r["points"]), f"{r['wall_s']:.0f}"]) + " |")
    note = ("**REDUCED STRENGTH** in at least one run: see each run's report.md for its settings.\n\n"
            if any(r["reduced_strength"] for r in rows) else "")
    note += ("C - AT: C/randAA (fresh-draw mean) minus AT/AA, in accuracy points. Intervals: 95% Wilson. purifier s / "
             "evaluate s: the stage's own time from its manifest (also for cache hits); row wall s: this sweep's time "
             "for the row (near 0 for cache hits).\n\n")
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
    with atomic_file(png) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def figure_rows(grid: dict, rows: list[dict]) -> list[dict]:
    """The sweep's rows as `comparison_figure` takes them: one label per grid combination, AT/AA and C/randAA
    (fresh-draw mean, the number the gap uses) with their 95% Wilson intervals from each run's results.json."""
    out = []
    for r in rows:
        ci = r["intervals_95"]
        out.append({"label": ", ".join(f"{k}={_cell(r['combo'][k])}" for k in grid),
                    "AT/AA": r["summary"]["AT/AA"], "AT/AA 95% CI": tuple(ci["AT/AA"]),
                    "C/randAA": r["summary"]["C/randAA fresh mean"],
                    "C/randAA 95% CI": tuple(ci["C/randAA fresh mean"])})
    return out


def figure_title(what: str, rows: list[dict]) -> str:
    """A title that names the attack strength: REDUCED STRENGTH when any run is, randAA's steps x EOT and eps when
    the runs share them."""
    reduced = any(r["reduced_strength"] for r in rows)
    sets = {(r["randaa_settings"].get("steps"), r["randaa_settings"].get("eot")) for r in rows}
    eps = {r["eps"] for r in rows}
    strength = "REDUCED STRENGTH" if reduced else "full strength"
    attack = (f"randAA {next(iter(sets))[0]} steps x EOT {next(iter(sets))[1]}" if len(sets) == 1
              else "randAA settings per run in comparison.md")
    threat = f"L-inf eps {next(iter(eps))}" if len(eps) == 1 else "L-inf eps per run"
    return f"{what}: {strength} ({attack}; classifier: standard AutoAttack; {threat})"


def comparison_figure(rows: list[dict], png: Path, title: str) -> None:
    """One pair of horizontal bars per row: the classifier alone under standard AutoAttack (AT/AA) and CARSO under
    randomised AutoAttack (C/randAA), each with its 95% interval as an error bar, and the gap in the row's label.

    ``rows``: dicts with ``label``, ``AT/AA``, ``AT/AA 95% CI`` (lo, hi), ``C/randAA``, ``C/randAA 95% CI``, all
    accuracies as fractions in [0, 1]. ``title`` should name the attack strength (`figure_title`)."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        raise ValueError("comparison_figure: no rows")
    n = len(rows)
    fig, ax = plt.subplots(figsize=(6.4, 1.6 + 0.75 * n), layout="constrained")
    h = 0.36
    series = (("AT/AA", "classifier alone, standard AutoAttack (AT/AA)", "#4c72b0", -h / 2),
              ("C/randAA", "CARSO, randomised AutoAttack, fresh-draw mean (C/randAA)", "#dd8452", h / 2))
    for key, label, color, dy in series:
        ys = [i + dy for i in range(n)]
        vals = [100 * r[key] for r in rows]
        lo = [100 * (r[key] - r[f"{key} 95% CI"][0]) for r in rows]
        hi = [100 * (r[f"{key} 95% CI"][1] - r[key]) for r in rows]
        ax.barh(ys, vals, height=h, color=color, label=label, xerr=[lo, hi],
                error_kw={"ecolor": "black", "capsize": 3, "elinewidth": 1})
        for y, r in zip(ys, rows):
            a, b = r[f"{key} 95% CI"]
            text = f"{100 * r[key]:.1f}%  ({100 * a:.1f}-{100 * b:.1f})"
            if r[key] >= 0.32:  # inside the bar
                ax.text(2, y, text, va="center", ha="left", fontsize=7, color="white", fontweight="bold")
            else:  # too short a bar: beyond its interval
                ax.text(100 * b + 1.5, y, text, va="center", ha="left", fontsize=7, color="black")
    labels = [textwrap.fill(r["label"], 30) + f"\nC - AT = {100 * (r['C/randAA'] - r['AT/AA']):+.1f} points"
              for r in rows]
    ax.set_yticks(range(n), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("robust accuracy (%), error bars: 95% Wilson intervals", fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    fig.suptitle("\n".join(textwrap.fill(line, 90) for line in title.splitlines()), fontsize=8)
    fig.legend(loc="outside lower center", fontsize=7, ncol=1, frameon=False)
    with atomic_file(png) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
