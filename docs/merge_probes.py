"""Merge probes.json files of one classifier, probed in parts (disjoint layer lists, same settings), into one table
and figure in the order of the architecture's default layer list. A layer's numbers do not depend on which other
layers a run probed (its seed comes from its name), so the merge equals one run over all of them.

    .venv/bin/python docs/merge_probes.py OUT_STEM PART.json [PART.json ...]

writes OUT_STEM.json, OUT_STEM.md and OUT_STEM.png (docs/results.md names the commands of the parts)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from pipeline import probe_report
from pipeline.models import build_classifier


def merge(parts: list[dict]) -> dict:
    first = parts[0]
    for p in parts[1:]:
        if p["classifier"] != first["classifier"] or p["arch"] != first["arch"]:
            raise SystemExit("the parts come from different classifiers or points")
        if {k: v for k, v in p["settings"].items()} != first["settings"]:
            raise SystemExit("the parts have different settings")
    order = build_classifier(first["arch"], first["dataset"], "swish").default_layers()
    rows = {r["layer"]: r for p in parts for r in p["layers"]}
    if len(rows) != sum(len(p["layers"]) for p in parts):
        raise SystemExit("a layer appears in two parts")
    merged = [dict(rows[name], index=i) for i, name in enumerate(n for n in order if n in rows)]
    return {**first, "layers": merged, "timings": {"parts_s": [p["timings"]["total_s"] for p in parts]}}


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
