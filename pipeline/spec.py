"""A stage's spec: exactly what determines its output, built in one place; its hash is the store key.

Each stage module declares

- ``READS``: the config fields (dotted paths, e.g. ``attack.eps``) whose values enter its spec: the fields of its
  own section that change what it writes, and any other it reads (``reads(cfg)`` where that depends on the config,
  e.g. the classifier's training settings only when ``classifier.source`` is ``train``);
- ``RESOLVED`` (optional): field -> input name, for fields of ``READS`` that enter the spec resolved, not as written
  (``activations.layers``: null and the architecture's explicit default list are one spec);
- ``inputs(ctx)``: the identities of the upstream outputs it reads (their keys, the classifier's weights sha256)
  and the resolved values.

``build_spec`` assembles the ``Spec`` (stage, code VERSION, the config values, the inputs), checking every value is
of a type the key can hold; ``Spec.key`` is its hash, and every manifest stores the spec it was written under.

While a stage runs, the config it sees (``ctx.cfg``) is ``restricted``: every field outside its spec, its upstream
stages' specs and ``KEY_FREE`` is replaced by a ``NotInSpec`` that raises on any use, so a stage cannot read a
setting that its key does not hold. ``tests/test_key_contract.py`` proves the contract field by field: every
config field is in some stage's ``READS`` or in ``KEY_FREE``, changing a field of a stage's ``READS`` changes that
stage's key, and each key-free field names the test that shows the output bytes do not depend on it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Iterable

# Fields no stage's output depends on (where a thing is, not what it is), each with why, and the test that shows
# the output bytes are identical when it changes.
_REBUILD_TEST = "tests/test_probes.py::test_verify_finds_corruption_leftovers_and_rebuild_repairs_to_the_same_bytes"
KEY_FREE: dict[str, tuple[str, str]] = {
    "name": ("the run's label in `pipeline plan` and error messages; no stage writes it",
             _REBUILD_TEST),
    "data.data_dir": ("where the dataset's files are read from; the data's identity (dataset, split, subset) is in "
                      "every spec, and each manifest records the sha256 of the arrays it read",
                      _REBUILD_TEST),
    "classifier.path": ("where a `classifier.source: file` checkpoint is read from; the spec holds the file's "
                        "sha256",
                        "tests/test_classifier_stage.py::test_classifier_train_then_cache_hit_then_file_source"),
}

SCALARS = (str, int, float, bool, type(None))


class SpecError(TypeError):
    """A spec value of a type the key cannot hold (a bug in a stage's spec, found by the tests, not by a run)."""


class NotInSpec:
    """A config value outside the running stage's spec: any use of it raises, naming the field and the stage."""

    __slots__ = ("path", "stage")

    def __init__(self, path: str, stage: str):
        self.path, self.stage = path, stage

    def _refuse(self, *_a, **_k):
        raise SpecReadError(f"stage '{self.stage}' read config field '{self.path}', which is not in its spec "
                            f"(add it to the stage's READS, or to pipeline/spec.py KEY_FREE with the test that shows "
                            f"it changes no output byte)")

    def __repr__(self) -> str:
        return f"<{self.path}: not in the spec of stage {self.stage}>"

    def __reduce__(self):  # crosses into Ray workers as itself, and refuses there
        return NotInSpec, (self.path, self.stage)

    def __deepcopy__(self, memo):
        return self


for _name in ("__bool__", "__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__", "__hash__", "__int__",
              "__float__", "__index__", "__str__", "__format__", "__iter__", "__len__", "__getitem__",
              "__contains__", "__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__",
              "__rtruediv__", "__floordiv__", "__mod__", "__neg__", "__abs__", "__round__"):
    setattr(NotInSpec, _name, NotInSpec._refuse)


class SpecReadError(RuntimeError):
    """A stage read a config field outside its spec: a bug in the stage, never a user error."""


@dataclass(frozen=True)
class Spec:
    stage: str
    version: int
    config: tuple[tuple[str, Any], ...]  # (field path, value) in READS order
    inputs: tuple[tuple[str, Any], ...]  # (name, identity or resolved value), sorted by name

    def as_dict(self) -> dict:
        return {"stage": self.stage, "code_version": self.version, "config": dict(self.config),
                "inputs": dict(self.inputs)}

    @property
    def key(self) -> str:
        blob = json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def check_value(value: Any, where: str) -> Any:
    """``value`` as the key holds it (tuples as lists), or SpecError for a type JSON cannot hold exactly."""
    if isinstance(value, float) and value != value:
        raise SpecError(f"{where}: NaN cannot be part of a key")
    if isinstance(value, SCALARS):
        return value
    if isinstance(value, (list, tuple)):
        return [check_value(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: check_value(v, f"{where}.{k}") for k, v in value.items()}
    raise SpecError(f"{where}: a value of type {type(value).__name__} cannot be part of a key")


def field_paths(cls) -> list[str]:
    """Every leaf field of a config dataclass, as dotted paths (``classifier.train.lr``)."""
    paths = []
    for f in dataclasses.fields(cls):
        tp = f.type if not isinstance(f.type, str) else _resolve(cls, f.name)
        if dataclasses.is_dataclass(tp):
            paths += [f"{f.name}.{p}" for p in field_paths(tp)]
        else:
            paths.append(f.name)
    return paths


def _resolve(cls, name: str):
    import typing

    return typing.get_type_hints(cls)[name]


def get(cfg, path: str) -> Any:
    obj = cfg
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def reads(mod, cfg) -> tuple[str, ...]:
    return tuple(mod.reads(cfg)) if hasattr(mod, "reads") else tuple(mod.READS)


def build_spec(ctx, stage: str) -> Spec:
    """The spec of ``stage`` under ``ctx``'s config and store (upstream outputs must exist: UpstreamMissing)."""
    mod = ctx.graph[stage]
    resolved = getattr(mod, "RESOLVED", {})
    inputs = mod.inputs(ctx)
    missing = {p: n for p, n in resolved.items() if p in reads(mod, ctx.cfg) and n not in inputs}
    if missing:
        raise SpecError(f"stage {stage}: the resolved value of {sorted(missing)} is not among its inputs")
    config = tuple((p, check_value(get(ctx.cfg, p), f"{stage}: {p}")) for p in reads(mod, ctx.cfg) if p not in resolved)
    return Spec(stage, mod.VERSION, config,
                tuple(sorted((k, check_value(v, f"{stage}: input {k}")) for k, v in inputs.items())))


def upstream_of(graph, stage: str, cfg) -> tuple[str, ...]:
    """The stages whose outputs ``stage`` reads (``upstream(cfg)`` where that depends on the config)."""
    mod = graph[stage]
    return tuple(mod.upstream(cfg)) if hasattr(mod, "upstream") else tuple(mod.UPSTREAM)


def allowed_fields(graph, stage: str, cfg) -> set[str]:
    """What a running stage may read: its spec's fields, its upstream stages' (their keys are in its spec), and
    the key-free ones."""
    want, todo, seen = set(KEY_FREE), [stage], set()
    while todo:
        s = todo.pop()
        if s in seen:
            continue
        seen.add(s)
        want |= set(reads(graph[s], cfg))
        todo += list(upstream_of(graph, s, cfg))
    return want


def restricted(cfg, allowed: Iterable[str], stage: str, prefix: str = ""):
    """``cfg`` with every leaf field outside ``allowed`` replaced by a ``NotInSpec``."""
    allowed = set(allowed)
    changes = {}
    for f in dataclasses.fields(cfg):
        path = f"{prefix}{f.name}"
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            changes[f.name] = restricted(value, allowed, stage, f"{path}.")
        elif path not in allowed:
            changes[f.name] = NotInSpec(path, stage)
    return dataclasses.replace(cfg, **changes) if changes else cfg


