"""Draw the README's figure from the committed numbers: docs/results/headline.json -> docs/results/headline.png.

    .venv/bin/python docs/make_figures.py [IN.json [OUT.png]]

The numbers are not recomputed here (the runs that measured them take hours of CPU; docs/results.md gives their
commands and commits); this only draws them with the figure `pipeline sweep` writes as comparison.png
(`pipeline.sweep.comparison_figure`)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from pipeline.sweep import comparison_figure

DOCS = Path(__file__).resolve().parent


def main(argv: list[str]) -> int:
    src = Path(argv[0]) if argv else DOCS / "results" / "headline.json"
    out = Path(argv[1]) if len(argv) > 1 else src.with_suffix(".png")
    data = json.loads(src.read_text())
    comparison_figure(data["rows"], out, data["title"])
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
