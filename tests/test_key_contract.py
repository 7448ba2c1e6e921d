"""The key contract, field by field (pipeline/spec.py): every config field is in some stage's spec (its READS) or
declared key-free; changing a field a stage's spec holds changes that stage's key, measured on the shared toy
store; each key-free field names the test that shows the output bytes do not depend on it (and that test exists);
a stage that reads a field outside its spec fails."""
import dataclasses
import pickle
import typing

import pytest

import stages
from pipeline import runner
from pipeline.config import RunConfig, load_config
from pipeline.context import UpstreamMissing
from pipeline.spec import KEY_FREE, NotInSpec, SpecError, SpecReadError, check_value, field_paths, get, reads, restricted
from pipeline.store import Store
from tests.conftest import CONFIG, REPO, TOY_JOB

# The configurations under which every field is read by some stage: the toy job, and the modes that switch on
# the fields it does not read (the classifier's RobustBench name, the purifier's recomputed activations, a fixed
# probe eps). Only the stages whose upstream outputs the toy store holds are checked in each.
MODES = {"toy job": [], "robustbench": ["classifier.source=robustbench", "classifier.robustbench_name=Carmon2019Unlabeled"],
         "recompute": ["purifier.activations_source=recompute"],
         "recompute, every layer": ["purifier.activations_source=recompute", "purifier.layers=null"], "probe eps": ["probes.eps=0.05"]}
# A second value for the fields whose type gives none (names that must exist).
ALTERNATIVES = {"classifier.arch": "wrn-16-1", "classifier.robustbench_name": "Gowal2020Uncovering",
                "activations.layers": ["conv2", "conv3"], "purifier.layers": ["conv1"], "probes.layers": ["conv1"]}


def _config(toy, extra=()) -> RunConfig:
    return load_config(REPO / CONFIG, [f"data.data_dir={toy.data}", *TOY_JOB, *extra])


def _ctx(toy, cfg):
    return runner.Context(cfg=cfg, store=Store(toy.store), log=lambda m: None)


def _other(path: str, value, tp):
    """A second valid value of a field: from its type (a Literal's other choice, a flipped bool, a number moved),
    or ALTERNATIVES."""
    if path in ALTERNATIVES:
        return ALTERNATIVES[path]
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union and type(None) in args:
        (tp,) = [a for a in args if a is not type(None)]
        if value is None:
            return 7 if tp is int else 0.05 if tp is float else pytest.fail(f"{path}: add a second value to ALTERNATIVES")
        origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return next(a for a in args if a != value)
    if tp is bool:
        return not value
    if tp is int:
        return value + 1
    if tp is float:
        return value * 0.5 if value else 0.5
    if origin is tuple:
        return (value[0] * 0.5, *value[1:])
    pytest.fail(f"{path}: no second value for a field of type {tp}; add one to ALTERNATIVES")


def _types(cls, prefix="") -> dict:
    out = {}
    for name, tp in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(tp):
            out |= _types(tp, f"{prefix}{name}.")
        else:
            out[f"{prefix}{name}"] = tp
    return out


def _replace(cfg, path: str, value):
    head, _, rest = path.partition(".")
    return dataclasses.replace(cfg, **{head: _replace(getattr(cfg, head), rest, value) if rest else value})


def _key(toy, cfg, stage):
    try:
        return _ctx(toy, cfg).key(stage)
    except UpstreamMissing:
        return None  # its identity now names an upstream output the store lacks: a different key


def test_every_config_field_is_in_a_spec_or_declared_key_free(toy):
    read = set()
    for extra in MODES.values():
        cfg = _config(toy, extra)
        for mod in stages.GRAPH.values():
            read |= set(reads(mod, cfg))
    fields = set(field_paths(RunConfig))
    undeclared = sorted(fields - read - set(KEY_FREE))
    assert not undeclared, (f"config field(s) {undeclared} are in no stage's spec (READS) and not declared "
                            f"key-free (pipeline/spec.py KEY_FREE)")
    assert not read & set(KEY_FREE), f"{sorted(read & set(KEY_FREE))}: both in a spec and declared key-free"
    assert not read - fields, f"{sorted(read - fields)}: READS names fields the config does not have"


def test_changing_a_field_of_a_stage_spec_changes_that_stage_key(toy):
    types, checked, unchanged = _types(RunConfig), 0, []
    for mode, extra in MODES.items():
        cfg = _config(toy, extra)
        for stage, mod in stages.GRAPH.items():
            try:
                base = _ctx(toy, cfg).key(stage)
            except UpstreamMissing:
                continue  # this mode's upstream outputs are not in the toy store
            for path in reads(mod, cfg):
                changed = _replace(cfg, path, _other(path, get(cfg, path), types[path]))
                checked += 1
                if _key(toy, changed, stage) == base:
                    unchanged.append(f"{stage}: {path} ({mode})")
    assert not unchanged, f"changing these fields left the stage's key unchanged: {unchanged}"
    assert checked > len(field_paths(RunConfig))  # every stage, every mode


def test_each_key_free_field_names_an_existing_test(toy):
    for path, (why, test) in KEY_FREE.items():
        assert why and path in field_paths(RunConfig)
        module, _, name = test.partition("::")
        assert (REPO / module).is_file() and f"def {name}(" in (REPO / module).read_text(), f"{path}: {test} missing"
        cfg = _config(toy)
        value = get(cfg, path)
        other = _replace(cfg, path, "elsewhere" if value is None or isinstance(value, str) else value)
        for stage in stages.GRAPH:
            assert _key(toy, other, stage) == _key(toy, cfg, stage), f"{path} changed the key of {stage}"


def test_a_stage_reading_outside_its_spec_fails(toy):
    cfg = _config(toy)
    view = restricted(cfg, {"attack.eps", "data.dataset"}, "attacks")
    assert view.attack.eps == cfg.attack.eps and view.data.dataset == cfg.data.dataset
    for use in (lambda v: v.attack.pgd_steps + 1, lambda v: f"{v.eval.samples}", lambda v: bool(v.probes.robust),
                lambda v: pickle.loads(pickle.dumps(v.purifier)).epochs * 2):  # also inside a Ray worker
        with pytest.raises(SpecReadError, match="stage 'attacks' read config field '"):
            use(view)
    assert isinstance(view.classifier.train.lr, NotInSpec)
    # What each stage of the toy job may read is enough to run it: the shared toy job ran every stage this way.
    assert toy.runs["job"]["returncode"] == 0


def test_a_spec_value_of_an_unsupported_type_fails():
    assert check_value({"a": (1, 2.0, None, "x")}, "f") == {"a": [1, 2.0, None, "x"]}
    for bad in (object(), {1: 2}, float("nan"), [set()]):
        with pytest.raises(SpecError):
            check_value(bad, "f")


def test_every_manifest_stores_its_spec(toy):
    cfg = _config(toy)
    for stage in ("classifier", "attacks", "activations", "purifier", "evaluate"):
        ctx = _ctx(toy, cfg)
        out = ctx.output(stage)
        m = out.manifest()
        assert m["spec"] == ctx.spec(stage).as_dict() and m["key"] == ctx.spec(stage).key == out.key
        assert set(m["spec"]["config"]) == set(reads(stages.GRAPH[stage], cfg)) - set(
            getattr(stages.GRAPH[stage], "RESOLVED", {}))
