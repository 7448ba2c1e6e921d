"""Merge probes.json files of one classifier, probed in parts, into one table and figure in the order of the
architecture's default layer list. A part may cover some of the layers (probes.layers) and some of the probe kinds
(probes.transfer, probes.robust): a layer's numbers do not depend on which other layers a run probed (its seed
comes from its name), and its two kinds are fitted and scored from separate seeds (layer seed + 1 for the transfer
probe, + 2 for the robust one), so the merge equals one run over all of them. Each (layer, kind) must come from
exactly one part; the parts must agree on the classifier, the scored points and every shared setting.

    .venv/bin/python docs/merge_probes.py OUT_STEM PART.json [PART.json ...]

writes OUT_STEM.json, OUT_STEM.md and OUT_STEM.png (docs/results.md names the commands of the parts)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from pipeline import probe_report
from pipeline.models import build_classifier

KINDS = ("transfer_probe", "robust_probe")


def _merged_settings(parts: list[dict]) -> dict:
    """The parts' settings, where a kind's settings block is None in the parts that did not fit that kind."""
    out = dict(parts[0]["settings"])
    for p in parts[1:]:
        s = p["settings"]
        if set(s) != set(out):
            raise SystemExit("the parts record different settings")
        for k, v in s.items():
            if k in KINDS and (out[k] is None or v is None):
                out[k] = out[k] if v is None else v
            elif v != out[k]:
                raise SystemExit(f"the parts differ in setting {k!r}: {out[k]!r} vs {v!r}")
    return out


def merge(parts: list[dict]) -> dict:
    first = parts[0]
    for p in parts[1:]:
        if (p["classifier"], p["arch"], p["dataset"]) != (first["classifier"], first["arch"], first["dataset"]):
            raise SystemExit("the parts come from different classifiers or points")
    settings = _merged_settings(parts)
    order = build_classifier(first["arch"], first["dataset"], "swish").default_layers()
    rows: dict[str, dict] = {}
    for p in parts:
        for r in p["layers"]:
            row = rows.setdefault(r["layer"], {k: v for k, v in r.items() if k not in KINDS and k != "seconds"})
            if (row["seed"], row["shape"]) != (r["seed"], r["shape"]):
                raise SystemExit(f"layer {r['layer']}: the parts disagree on its seed or shape")
            for kind in KINDS:
                if kind in r:
                    if kind in row:
                        raise SystemExit(f"layer {r['layer']}: its {kind} appears in two parts")
                    row[kind] = r[kind]
            row["seconds"] = row.get("seconds", 0.0) + r["seconds"]
    kinds = {k for r in rows.values() for k in KINDS if k in r}
    missing = [name for name, r in rows.items() if set(k for k in KINDS if k in r) != kinds]
    if missing:
        raise SystemExit(f"layers {missing} lack a probe kind that other layers have: {sorted(kinds)}")
    merged = [dict(rows[name], index=i) for i, name in enumerate(n for n in order if n in rows)]
    return {**first, "settings": settings, "layers": merged,
            "timings": {"parts_s": [p["timings"].get("total_s", sum(p["timings"].get("parts_s", [])))
                                    for p in parts]}}


def main(argv: list[str]) -> int:
    stem, parts = Path(argv[0]), [json.loads(Path(a).read_text()) for a in argv[1:]]
    result = merge(parts)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    stem.with_suffix(".md").write_text(probe_report.markdown(result))
    probe_report.figure(result, stem.with_suffix(".png"))
    print(stem.with_suffix(".md"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
