"""Merging per-chunk evaluation outcomes into results.json, report.md and the reconstruction grid."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from .evaluation import PAPER_STRENGTH, reduced_settings


def _mean(xs: list[int]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def _fresh(parts: list[dict]) -> dict:
    """Fresh-draw scores: per-draw accuracy (mean and worst draw) and per-point worst case (all draws right)."""
    draws = len(parts[0]["fresh"])
    per_draw = [[v for p in parts for v in p["fresh"][d]] for d in range(draws)]
    all_right = [min(col) for col in zip(*per_draw)]
    accs = [_mean(d) for d in per_draw]
    return {"draws": draws, "mean": _mean(accs), "worst_draw": min(accs), "per_point_worst": _mean(all_right)}


def _attack(per: list[dict], name: str) -> dict:
    parts = [c[name] for c in per]
    res = {"settings": parts[0]["settings"]}
    if "runner" in parts[0]:
        res["runner"] = _mean([v for p in parts for v in p["runner"]])
    if "fresh" in parts[0]:
        res["fresh"] = _fresh(parts)
    if "warnings" in parts[0]:
        res["warnings"] = dict(Counter(w for p in parts for w in p["warnings"]))
    return res


def merge(out, cfg, chunks: list[tuple[int, int, int]]) -> dict:
    """Every chunk exactly once, in order."""
    per = [json.loads((out.dir / "chunks" / f"chunk-{c:04d}.json").read_text()) for c, _, _ in chunks]
    if [p["range"] for p in per] != [[lo, hi] for _, lo, hi in chunks]:
        raise RuntimeError(f"{out.dir}: chunk files do not cover the test points exactly once")
    n = sum(p["n"] for p in per)
    ev = cfg.eval
    from .data import info

    chance = 1.0 / info(cfg.data.dataset).num_classes
    clean_draws = [[v for p in per for v in p["carso_clean"][d]] for d in range(ev.fresh_draws)]
    grad = {k: sum(p["carso_randaa"]["grad_at_start"][k] for p in per) for k in ("nan", "zero", "n")}
    res = {
        "points": n, "dataset": cfg.data.dataset, "eps": ev.eps, "samples_per_input": ev.samples,
        "aggregation": ev.aggregation, "seed": ev.seed, "chunk_seeds": [p["seed"] for p in per],
        "classifier_clean": _mean([v for p in per for v in p["clf_clean"]]),
        "carso_clean": {"draws": ev.fresh_draws, "mean": _mean([_mean(d) for d in clean_draws]),
                        "worst_draw": min(_mean(d) for d in clean_draws)},
        "classifier_autoattack": _attack(per, "clf_aa"),
        "carso_randaa": _attack(per, "carso_randaa"),
        "carso_pgd_eot": _attack(per, "carso_pgd_eot"),
        "obfuscation_check": _attack(per, "obfuscation"),
        "gradient_at_attack_start": {"nan_share": grad["nan"] / grad["n"], "zero_share": grad["zero"] / grad["n"]},
    }
    ob = res["obfuscation_check"]
    ob["chance"] = chance
    ob["passed"] = ob["fresh"]["mean"] <= chance and ob["runner"] <= chance
    reduced = {k: {"used": u, "paper": pv} for k, (u, pv) in reduced_settings(ev).items()}
    res["reduced_strength"] = bool(reduced)
    res["reduced_settings"] = reduced
    res["paper_strength"] = PAPER_STRENGTH
    res["summary"] = {"AT/Cl": res["classifier_clean"], "C/Cl": res["carso_clean"]["mean"],
                      "AT/AA": res["classifier_autoattack"]["runner"], "C/randAA": res["carso_randaa"]["runner"],
                      "C/randAA fresh mean": res["carso_randaa"]["fresh"]["mean"],
                      "C/randAA fresh worst": res["carso_randaa"]["fresh"]["per_point_worst"],
                      "PGD+EOT fresh mean": res["carso_pgd_eot"]["fresh"]["mean"],
                      "PGD+EOT fresh worst": res["carso_pgd_eot"]["fresh"]["per_point_worst"]}
    return res


def _pct(v: float) -> str:
    return f"{100 * v:.2f}%"


def summary_lines(r: dict) -> list[str]:
    s = r["summary"]
    tag = " [REDUCED STRENGTH]" if r["reduced_strength"] else ""
    ob = r["obfuscation_check"]
    return [f"{r['points']} points, eps {r['eps']:g}{tag}",
            f"AT/Cl {_pct(s['AT/Cl'])} | C/Cl {_pct(s['C/Cl'])} | AT/AA {_pct(s['AT/AA'])} | "
            f"C/randAA {_pct(s['C/randAA'])} (fresh draws: mean {_pct(s['C/randAA fresh mean'])}, worst "
            f"{_pct(s['C/randAA fresh worst'])}) | PGD+EOT {_pct(s['PGD+EOT fresh mean'])}",
            f"obfuscation check at eps {ob['settings']['eps']:g}: {_pct(ob['fresh']['mean'])} vs chance "
            f"{_pct(ob['chance'])}: {'passed' if ob['passed'] else 'FAILED'}"]


def markdown(r: dict) -> str:
    s, aa, ra, pe, ob = (r["summary"], r["classifier_autoattack"], r["carso_randaa"], r["carso_pgd_eot"],
                         r["obfuscation_check"])
    lines = [f"# CARSO evaluation: {r['dataset']}", ""]
    if r["reduced_strength"]:
        lines += ["> **REDUCED STRENGTH.** These settings are below the paper's: "
                  + "; ".join(f"{k} = {v['used']} (paper: {v['paper']})" for k, v in r["reduced_settings"].items())
                  + ". The robust accuracies below are upper bounds of what a full-strength attack would leave.", ""]
    if not ob["passed"]:
        lines += [f"> **WARNING: gradient-obfuscation check FAILED.** At eps {ob['settings']['eps']:g} CARSO keeps "
                  f"{_pct(ob['fresh']['mean'])} accuracy (fresh draws), above chance ({_pct(ob['chance'])}).", ""]
    lines += [f"{r['points']} test points, L-inf eps = {r['eps']:g}, {r['samples_per_input']} reconstructions per "
              f"input, {r['aggregation']} aggregation, seed {r['seed']}.", "",
              "| AT/Cl | C/Cl | AT/AA | C/randAA | (PGD+EOT) |", "| --- | --- | --- | --- | --- |",
              f"| {_pct(s['AT/Cl'])} | {_pct(s['C/Cl'])} | {_pct(s['AT/AA'])} | {_pct(s['C/randAA'])} | "
              f"({_pct(s['PGD+EOT fresh mean'])}) |", "",
              "- AT/Cl: classifier alone, clean. C/Cl: CARSO, clean, mean over "
              f"{r['carso_clean']['draws']} forward passes (worst pass {_pct(r['carso_clean']['worst_draw'])}).",
              f"- AT/AA: classifier alone, standard AutoAttack ({', '.join(aa['settings']['attacks'])}; APGD "
              f"{aa['settings']['apgd_steps']} steps, {aa['settings']['apgd_t_targets']} target classes, Square "
              f"{aa['settings']['square_queries']} queries; {aa['settings']['library']}).",
              f"- C/randAA: CARSO end to end, AutoAttack 'rand' ({', '.join(ra['settings']['attacks'])}, "
              f"{ra['settings']['steps']} steps, EOT {ra['settings']['eot']}, {ra['settings']['restarts']} restart), "
              "as the runner scores it (one stochastic pass). Re-scored on "
              f"{ra['fresh']['draws']} fresh passes: mean {_pct(ra['fresh']['mean'])}, worst pass "
              f"{_pct(ra['fresh']['worst_draw'])}, points right on every pass {_pct(ra['fresh']['per_point_worst'])}.",
              f"- PGD+EOT: {pe['settings']['steps']} steps of {pe['settings']['step_size']:g}, EOT "
              f"{pe['settings']['eot']}, CE, random start; fresh passes: mean {_pct(pe['fresh']['mean'])}, points "
              f"right on every pass {_pct(pe['fresh']['per_point_worst'])}.",
              f"- Gradient-obfuscation check: the same randAA at eps {ob['settings']['eps']:g}: runner "
              f"{_pct(ob['runner'])}, fresh mean {_pct(ob['fresh']['mean'])}, chance {_pct(ob['chance'])}: "
              f"**{'passed' if ob['passed'] else 'FAILED'}**.",
              f"- Input gradient at the start of the attacks: NaN for {_pct(r['gradient_at_attack_start']['nan_share'])}"
              f" of points, exactly zero for {_pct(r['gradient_at_attack_start']['zero_share'])}.",
              "- Points misclassified by any clean pass count as not robust.", ""]
    warns = {**aa.get("warnings", {}), **ra.get("warnings", {}), **ob.get("warnings", {})}
    lines += ["## AutoAttack runtime checks", ""]
    lines += [f"- ({n}x) {w}" for w, n in warns.items()] or ["- none raised"]
    lines += ["", "## Reconstructions", "", "![inputs, adversarial inputs (randAA), reconstructions](reconstructions.png)",
              ""]
    return "\n".join(lines)


def grid(npz: Path, png: Path) -> bool:
    """Rows: clean inputs, randAA adversarial inputs, one CARSO reconstruction of each adversarial input."""
    if not npz.exists():
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    with np.load(npz, allow_pickle=False) as d:
        rows = [d["x"], d["x_adv"], d["recon"]]
    k = rows[0].shape[0]
    fig, axes = plt.subplots(3, k, figsize=(1.2 * k, 3.9), squeeze=False)
    for r, (imgs, title) in enumerate(zip(rows, ("input", "adversarial", "reconstruction"))):
        for c in range(k):
            img = imgs[c].transpose(1, 2, 0)
            axes[r][c].imshow(img.squeeze(-1) if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1)
            axes[r][c].axis("off")
        axes[r][0].set_title(title, fontsize=8, loc="left")
    fig.tight_layout()
    tmp = png.with_name(".tmp-" + png.name)
    fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    tmp.replace(png)
    return True
