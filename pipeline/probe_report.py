"""The probes stage's report: the table of ``report.md`` and the figure ``probes.png`` (accuracy against layer
depth, one line per column, the classifier's own clean and PGD accuracy across it)."""
from __future__ import annotations

from pathlib import Path

from .report import wilson
from .store import atomic_file

# (probe kind, score) columns, in table order.
COLUMNS = [("transfer_probe", "clean"), ("transfer_probe", "transfer"), ("transfer_probe", "adaptive"),
           ("robust_probe", "clean"), ("robust_probe", "transfer"), ("robust_probe", "adaptive")]
KIND = {"transfer_probe": "transfer probe", "robust_probe": "robust probe"}


def _pct(v: float) -> str:
    return f"{100 * v:.1f}%"


def columns(result: dict) -> list[tuple[str, str]]:
    return [c for c in COLUMNS if c[0] in result["layers"][0]]


def best_robust(result: dict) -> dict | None:
    """The layer whose robust probe keeps the most accuracy under the adaptive attack (ties: the shallower)."""
    rows = [r for r in result["layers"] if "robust_probe" in r]
    return max(rows, key=lambda r: (r["robust_probe"]["adaptive"], -r["index"])) if rows else None


def ranked(result: dict) -> list[str]:
    """The probed layers, best first, by the robust probe's adaptive accuracy (ties: the shallower first): how the
    study chooses conditioning layers from the probes (its row (c) takes the first three)."""
    rows = [r for r in result["layers"] if "robust_probe" in r]
    return [r["layer"] for r in sorted(rows, key=lambda r: (-r["robust_probe"]["adaptive"], r["index"]))]


def markdown(result: dict) -> str:
    s, clf = result["settings"], result["classifier"]
    atk = s["scoring_attack"]
    lo, hi = s["points"]
    cols = columns(result)
    n = clf["n"]
    lines = [f"# Linear probes: {result['dataset']}, {result['arch']}", "",
             f"{n} test points (indices {lo} to {hi - 1}); L-inf eps = {s['eps']:g}; every attack is PGD "
             f"{atk['steps']} steps of {atk['step_size']:g}, CE, random start. transfer: PGD crafted against the "
             "classifier alone, read by the probe (plain accuracy on the attacked points: it can exceed clean); adaptive: "
             "PGD crafted against the probe itself through the frozen classifier layers up to its layer (a point "
             "counts when the probe is right on it clean and attacked, as for the classifier's PGD).", ""]
    if s.get("transfer_probe"):
        lines.append(f"- transfer probe: fitted on {s['transfer_probe']['fitted_on']}, {s['transfer_probe']['epochs']} "
                     "epochs.")
    if s.get("robust_probe"):
        r = s["robust_probe"]
        lines.append(f"- robust probe: fitted on {r['fitted_on']} (PGD {r['pgd_steps']} x {r['pgd_step_size']:g} at "
                     f"eps {s['eps']:g}), {r['epochs']} epochs.")
    lo_c, hi_c = wilson(clf["pgd"], n)
    lines += [f"- the classifier itself: clean {_pct(clf['clean'])}, PGD {_pct(clf['pgd'])} (95% CI "
              f"{_pct(lo_c)}-{_pct(hi_c)}).", "",
              "| # | layer | shape | " + " | ".join(f"{KIND[k]}: {c}" for k, c in cols) + " |",
              "| --- | --- | --- | " + " | ".join("---" for _ in cols) + " |"]
    for r in result["layers"]:
        lines.append(f"| {r['index']} | `{r['layer']}` | {'x'.join(map(str, r['shape']))} | "
                     + " | ".join(_pct(r[k][c]) for k, c in cols) + " |")
    best = best_robust(result)
    if best:
        lines += ["", f"Best robust probe under the adaptive attack: `{best['layer']}` at "
                  f"{_pct(best['robust_probe']['adaptive'])}, against the classifier's own {_pct(clf['pgd'])} at its "
                  "output (95% Wilson intervals on "
                  f"{n} points are about +-{50 * (wilson(0.5, n)[1] - wilson(0.5, n)[0]):.0f} points at worst).",
                  "", "Layers by the robust probe's adaptive accuracy, best first: "
                  + ", ".join(f"`{name}`" for name in ranked(result)) + "."]
    return "\n".join(lines) + "\n"


def figure(result: dict, png: Path) -> bool:
    """Accuracy against layer depth, one line per column, the classifier's clean and PGD accuracy as horizontal
    lines. Returns False when there is nothing to plot."""
    rows = result["layers"]
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clf, cols = result["classifier"], columns(result)
    xs = [r["index"] for r in rows]
    styles = {"clean": "o-", "transfer": "s--", "adaptive": "^-"}
    colors = {"transfer_probe": "tab:blue", "robust_probe": "tab:red"}
    fig, ax = plt.subplots(figsize=(max(5.0, 0.45 * len(rows) + 2), 3.8))
    for k, c in cols:
        ax.plot(xs, [100 * r[k][c] for r in rows], styles[c], color=colors[k], label=f"{KIND[k]}, {c}",
                markersize=4, linewidth=1.2)
    ax.axhline(100 * clf["clean"], color="black", linestyle=":", linewidth=1, label="classifier, clean")
    ax.axhline(100 * clf["pgd"], color="black", linestyle="-.", linewidth=1, label="classifier, PGD")
    ax.set_xticks(xs)
    ax.set_xticklabels([r["layer"] for r in rows], rotation=60, ha="right", fontsize=6)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    s = result["settings"]
    ax.set_title(f"{result['arch']} on {result['dataset']}: linear probes per layer (PGD-{s['scoring_attack']['steps']}, "
                 f"eps {s['eps']:g}, {clf['n']} points)", fontsize=8)
    ax.legend(fontsize=6, loc="lower left", ncol=2)
    fig.tight_layout()
    with atomic_file(png) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return True
