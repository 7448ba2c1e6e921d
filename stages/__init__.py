"""The stage registry: every stage module, in pipeline order. Each declares

- ``VERSION``: its code version, part of its store key (bump it whenever a change alters what it writes);
- ``UPSTREAM``: the stages whose outputs it reads (``upstream(cfg)`` where that depends on the config);
- ``READS`` (or ``reads(cfg)``), ``RESOLVED`` and ``inputs(ctx)``: its spec, everything in the config and upstream
  that determines its output (``pipeline/spec.py``; the store key is the spec's hash);
- ``run(ctx, out)``: the work, into ``out``.

``pipeline.runner`` imports this registry; the stages import ``pipeline.context``, never the runner.
"""
from pipeline.spec import upstream_of

from . import activations, attacks, classifier, evaluate, probes, purifier

GRAPH = {"classifier": classifier, "attacks": attacks, "activations": activations, "purifier": purifier,
         "evaluate": evaluate, "probes": probes}
# Stages that `--stage all` never runs: measurements beside the main job, run on request (`--stage probes`).
SIDE = ("probes",)


def upstream(stage: str, cfg) -> tuple[str, ...]:
    return upstream_of(GRAPH, stage, cfg)
