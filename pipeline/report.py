"""Merging per-chunk evaluation outcomes into results.json, report.md and the reconstruction grid."""
from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np

from .data import info
from .evaluation import CARSO_ATTACKS, PAPER_STRENGTH, pct, reduced_settings
from .store import atomic_file, require_intact


def _mean(xs: list[int]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def _fresh(parts: list[dict]) -> dict:
    """Fresh-draw scores: per-draw accuracy (mean and worst draw) and per-point worst case (all draws right)."""
    draws = len(parts[0]["fresh"])
    per_draw = [[v for p in parts for v in p["fresh"][d]] for d in range(draws)]
    all_right = [min(col) for col in zip(*per_draw)]
    accs = [_mean(d) for d in per_draw]
    return {"draws": draws, "mean": _mean(accs), "worst_draw": min(accs), "per_point_worst": _mean(all_right)}


def wilson(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion ``p`` measured on ``n`` points."""
    if n == 0:
        return (float("nan"), float("nan"))
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))


def _diagnostics(per: list[dict], training: dict | None) -> dict:
    """Purification and stochasticity (from the chunks) and the purifier's training (from its final metrics)."""
    parts = [p["diagnostics"] for p in per]
    draws = len(parts[0]["carso_pgd"])
    carso_pgd = [_mean([v for p in parts for v in p["carso_pgd"][d]]) for d in range(draws)]
    out = {"purification": {"settings": parts[0]["settings"],
                            "classifier": _mean([v for p in parts for v in p["clf_pgd"]]),
                            "carso": {"draws": draws, "mean": _mean(carso_pgd), "worst_draw": min(carso_pgd)}},
           "stochasticity": {"disagreement_share": _mean([v for p in parts for v in p["disagree"]]),
                             "mean_pixel_std": _mean([v for p in parts for v in p["pixel_std"]]),
                             "on": "clean inputs"}}
    if training:
        kl_dims = training.get("kl_per_dim") or []
        out["training"] = {"final_kl": training["kl"], "active_units": training.get("active_units"),
                           "latent_dims": len(kl_dims), "active_threshold_nats": 0.01}
    return out


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


def merge(out, cfg, chunks: list[tuple[int, int, int]], training: dict | None = None) -> dict:
    """Every chunk exactly once, in order, each chunk file checked against its receipt (size and sha256)
    before it is read. ``training``: the purifier's final-epoch metrics."""
    per = []
    for c, _, _ in chunks:
        path = out.dir / "chunks" / f"chunk-{c:04d}.json"
        receipt = json.loads(out.unit_receipt(f"chunk-{c:04d}").read_text())
        require_intact(out, next(r for r in receipt["files"] if r["name"] == f"chunks/chunk-{c:04d}.json"))
        per.append(json.loads(path.read_text()))
    if [p["range"] for p in per] != [[lo, hi] for _, lo, hi in chunks]:
        raise RuntimeError(f"{out.dir}: chunk files do not cover the test points exactly once")
    n = sum(p["n"] for p in per)
    ev = cfg.eval
    chance = 1.0 / info(cfg.data.dataset).num_classes
    clean_draws = [[v for p in per for v in p["carso_clean"][d]] for d in range(ev.fresh_draws)]
    checked = next(a.name for a in ran(per[0]) if "grad_at_start" in per[0][a.name])  # randAA's starting gradient
    grad = {k: sum(p[checked]["grad_at_start"][k] for p in per) for k in ("nan", "zero", "n")}
    res = {
        "points": n, "first_example": ev.first_example, "dataset": cfg.data.dataset, "eps": ev.eps, "samples_per_input": ev.samples,
        "aggregation": ev.aggregation, "seed": ev.seed, "chunk_seeds": [p["seed"] for p in per],
        "classifier_clean": _mean([v for p in per for v in p["clf_clean"]]),
        "carso_clean": {"draws": ev.fresh_draws, "mean": _mean([_mean(d) for d in clean_draws]),
                        "worst_draw": min(_mean(d) for d in clean_draws)},
        "classifier_autoattack": _attack(per, "clf_aa"),
        **{a.key: _attack(per, a.name) for a in ran(per[0])},
        "gradient_at_attack_start": {"nan_share": grad["nan"] / grad["n"], "zero_share": grad["zero"] / grad["n"]},
        "diagnostics": _diagnostics(per, training),
    }
    ob = res["obfuscation_check"]
    ob["chance"] = chance
    ob["passed"] = ob["fresh"]["mean"] <= chance and ob["runner"] <= chance
    reduced = {k: {"used": u, "paper": pv} for k, (u, pv) in reduced_settings(ev).items()}
    res["reduced_strength"] = bool(reduced)
    res["reduced_settings"] = reduced
    res["paper_strength"] = PAPER_STRENGTH
    res["summary"] = {"AT/Cl": res["classifier_clean"], "C/Cl": res["carso_clean"]["mean"],
                      "AT/AA": res["classifier_autoattack"]["runner"]}
    for a in ran(per[0]):
        if a.label:
            e = res[a.key]
            res["summary"] |= {**({a.label: e["runner"]} if a.runner else {}),
                               f"{a.label} fresh mean": e["fresh"]["mean"],
                               **({f"{a.label} fresh worst": e["fresh"]["per_point_worst"]} if a.worst else {})}
    s = res["summary"]
    # The question the defence must answer: does CARSO under randAA (fresh-draw mean) keep more than its classifier
    # under standard AutoAttack? In accuracy points, with 95% Wilson intervals on both.
    res["carso_minus_classifier"] = s["C/randAA fresh mean"] - s["AT/AA"]
    res["intervals_95"] = {k: wilson(s[k], n) for k in ("AT/Cl", "C/Cl", "AT/AA", "C/randAA", "C/randAA fresh mean")}
    return res


_pct = pct  # a fraction as a percentage with two decimals (pipeline.evaluation.pct)


def ran(record: dict) -> list:
    """The entries of ``CARSO_ATTACKS`` whose results a chunk record (or results.json) holds, in their order."""
    return [a for a in CARSO_ATTACKS if a.name in record or a.key in record]


def _others(r: dict) -> list:
    """The robustness numbers after the headline C/randAA: (label, fresh mean) of every other labelled attack."""
    return [(a.label, r["summary"][f"{a.label} fresh mean"]) for a in ran(r) if a.label and not a.runner]


def diagnostics_line(r: dict) -> str:
    d = r["diagnostics"]
    pu, st, tr = d["purification"], d["stochasticity"], d.get("training")
    line = (f"diagnostics: purification of PGD-{pu['settings']['steps']} vs the classifier alone: classifier "
            f"{_pct(pu['classifier'])}, CARSO {_pct(pu['carso']['mean'])} | stochasticity: "
            f"{_pct(st['disagreement_share'])} of points with disagreeing reconstructions, pixel std "
            f"{st['mean_pixel_std']:.4f}")
    if tr:
        line += f" | training: final KL {tr['final_kl']:.2f} nats, {tr['active_units']}/{tr['latent_dims']} active units"
    return line


def running_line(r: dict) -> str:
    """One line of the numbers on the points finished so far (printed while a long evaluation runs)."""
    s = r["summary"]
    return (f"{r['points']} points{' [REDUCED STRENGTH]' if r['reduced_strength'] else ''}: AT/AA {_pct(s['AT/AA'])}, "
            f"C/randAA fresh mean {_pct(s['C/randAA fresh mean'])}"
            + "".join(f", {label} {_pct(v)}" for label, v in _others(r)) + f", C/Cl {_pct(s['C/Cl'])}")


def summary_lines(r: dict) -> list[str]:
    s = r["summary"]
    tag = " [REDUCED STRENGTH]" if r["reduced_strength"] else ""
    ob = r["obfuscation_check"]
    first = r.get("first_example", 0)
    lines = [f"{r['points']} points (test {first}-{first + r['points'] - 1}), eps {r['eps']:g}{tag}",
             f"AT/Cl {_pct(s['AT/Cl'])} | C/Cl {_pct(s['C/Cl'])} | AT/AA {_pct(s['AT/AA'])} | "
             f"C/randAA {_pct(s['C/randAA'])} (fresh draws: mean {_pct(s['C/randAA fresh mean'])}, worst "
             f"{_pct(s['C/randAA fresh worst'])})" + "".join(f" | {label} {_pct(v)}" for label, v in _others(r)),
             f"C/randAA (fresh mean) - AT/AA = {100 * r['carso_minus_classifier']:+.2f} points",
             diagnostics_line(r),
             f"obfuscation check at eps {ob['settings']['eps']:g}: {_pct(ob['fresh']['mean'])} vs chance "
             f"{_pct(ob['chance'])}: {'passed' if ob['passed'] else 'FAILED'}"]
    return lines


def markdown(r: dict) -> str:
    s, aa, ob = r["summary"], r["classifier_autoattack"], r["obfuscation_check"]
    attacks = ran(r)
    lines = [f"# CARSO evaluation: {r['dataset']}", ""]
    if r["reduced_strength"]:
        lines += ["> **REDUCED STRENGTH.** These settings are below the paper's: "
                  + "; ".join(f"{k} = {v['used']} (paper: {v['paper']})" for k, v in r["reduced_settings"].items())
                  + ". The robust accuracies below are upper bounds of what a full-strength attack would leave.", ""]
    if not ob["passed"]:
        lines += [f"> **WARNING: gradient-obfuscation check FAILED.** At eps {ob['settings']['eps']:g} CARSO keeps "
                  f"{_pct(ob['fresh']['mean'])} accuracy (fresh draws), above chance ({_pct(ob['chance'])}).", ""]
    first = r.get("first_example", 0)
    ci = r["intervals_95"]
    lines += [f"{r['points']} test points (indices {first} to {first + r['points'] - 1}), L-inf eps = {r['eps']:g}, "
              f"{r['samples_per_input']} reconstructions per input, {r['aggregation']} aggregation, seed {r['seed']}.", "",
              "| AT/Cl | C/Cl | AT/AA | C/randAA | (PGD+EOT) |", "| --- | --- | --- | --- | --- |",
              f"| {_pct(s['AT/Cl'])} | {_pct(s['C/Cl'])} | {_pct(s['AT/AA'])} | {_pct(s['C/randAA'])} | "
              f"({_pct(s['PGD+EOT fresh mean'])}) |", "",
              "- AT/Cl: classifier alone, clean. C/Cl: CARSO, clean, mean over "
              f"{r['carso_clean']['draws']} forward passes (worst pass {_pct(r['carso_clean']['worst_draw'])}).",
              f"- AT/AA: classifier alone, standard AutoAttack ({', '.join(aa['settings']['attacks'])}; APGD "
              f"{aa['settings']['apgd_steps']} steps, {aa['settings']['apgd_t_targets']} target classes, Square "
              f"{aa['settings']['square_queries']} queries; {aa['settings']['library']}).",
              *[a.describe(r[a.key], r) for a in attacks if a.label],
              f"- **C/randAA (fresh mean) - AT/AA = {100 * r['carso_minus_classifier']:+.2f} points.** 95% intervals "
              f"({r['points']} points): AT/AA {_pct(ci['AT/AA'][0])}-{_pct(ci['AT/AA'][1])}, C/randAA fresh mean "
              f"{_pct(ci['C/randAA fresh mean'][0])}-{_pct(ci['C/randAA fresh mean'][1])}.",
              *[a.describe(r[a.key], r) for a in attacks if not a.label],
              f"- Input gradient at the start of the attacks: NaN for {_pct(r['gradient_at_attack_start']['nan_share'])}"
              f" of points, exactly zero for {_pct(r['gradient_at_attack_start']['zero_share'])}.",
              "- Points misclassified by any clean pass count as not robust.", ""]
    warns = {**aa.get("warnings", {})}
    for a in attacks:
        warns |= r[a.key].get("warnings", {})
    lines += ["## AutoAttack runtime checks", ""]
    lines += [f"- ({n}x) {w}" for w, n in warns.items()] or ["- none raised"]
    d = r["diagnostics"]
    pu, st, tr = d["purification"], d["stochasticity"], d.get("training")
    lines += ["", "## Diagnostics (before the attacks)", "",
              f"- Purification (the paper's appendix C question): PGD examples crafted against the classifier alone "
              f"({pu['settings']['steps']} steps of {pu['settings']['step_size']:g}, eps {pu['settings']['eps']:g}, "
              f"random start, CE). Classifier {_pct(pu['classifier'])}; CARSO {_pct(pu['carso']['mean'])} (mean of "
              f"{pu['carso']['draws']} passes, worst {_pct(pu['carso']['worst_draw'])}).",
              f"- Stochasticity, on the clean inputs: the predictions on the {r['samples_per_input']} reconstructions "
              f"disagree for {_pct(st['disagreement_share'])} of points; mean per-pixel std across the "
              f"reconstructions {st['mean_pixel_std']:.4f} (pixels in [0, 1])."]
    if tr:
        lines += [f"- Training: final-epoch KL {tr['final_kl']:.3f} nats; {tr['active_units']} of {tr['latent_dims']} "
                  f"latent dimensions active (average KL > {tr['active_threshold_nats']:g} nats); how much z moves "
                  "the predictions is the stochasticity line above."]
    lines += ["", "## Reconstructions", "", "![inputs, adversarial inputs (randAA), reconstructions](reconstructions.png)",
              "", "Every reconstruction of a few clean inputs and of their randAA adversarial versions:", "",
              "![all reconstructions of clean and attacked inputs](samples.png)", ""]
    return "\n".join(lines)


def grid(npz: Path, png: Path) -> bool:
    """Rows: clean inputs, randAA adversarial inputs, one CARSO reconstruction of each adversarial input."""
    if not npz.exists():
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
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
    with atomic_file(png) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return True


def samples_grid(npz: Path, png: Path) -> bool:
    """One row per point: the clean input, its N reconstructions, the randAA input, its N reconstructions."""
    if not npz.exists():
        return False
    with np.load(npz, allow_pickle=False) as d:
        if "recon_clean_all" not in d:
            return False
        x, xa, rc, ra = d["x"], d["x_adv"], d["recon_clean_all"], d["recon_adv_all"]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k, n = x.shape[0], rc.shape[0]
    cols = 2 * (n + 1)
    fig, axes = plt.subplots(k, cols, figsize=(0.8 * cols, 0.85 * k + 0.3), squeeze=False)
    for r in range(k):
        imgs = [x[r], *rc[:, r], xa[r], *ra[:, r]]
        for c, img in enumerate(imgs):
            img = img.transpose(1, 2, 0)
            axes[r][c].imshow(img.squeeze(-1) if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1)
            axes[r][c].axis("off")
    axes[0][0].set_title("clean", fontsize=7)
    axes[0][1].set_title(f"{n} reconstructions", fontsize=7, loc="left")
    axes[0][n + 1].set_title("randAA", fontsize=7)
    axes[0][n + 2].set_title(f"{n} reconstructions", fontsize=7, loc="left")
    fig.tight_layout(pad=0.2)
    with atomic_file(png) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)
    return True
