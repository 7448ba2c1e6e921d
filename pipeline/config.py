"""Typed, validated run configuration.

A config is a tree of small keyword-only frozen dataclasses, one per component. YAML files and
``--set key=value`` overrides go through the same validation, and every error names the file and the full
dotted key (``configs/fmnist.yaml: attack.eps: must be > 0 (got -1.0)``).

Range checks live next to each field as metadata (``rng(gt=0)``), so a reader sees the default, the type and
the valid range of a setting on one line.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from .errors import EXIT_CONFIG, UserError
from .kinds import N_KINDS


class ConfigError(UserError, ValueError):
    """A config file or override is invalid. ``str(err)`` is one line naming the source and the key."""

    exit_code = EXIT_CONFIG

    def __init__(self, source: str, key: str, message: str):
        self.source, self.key, self.message = source, key, message
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{key}: {message}" if key else f"{where}{message}")


def rng(*, gt=None, ge=None, lt=None, le=None, default=dataclasses.MISSING, default_factory=dataclasses.MISSING):
    """A dataclass field with a numeric range check (None values are never range-checked)."""
    meta = {"gt": gt, "ge": ge, "lt": lt, "le": le}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


# --------------------------------------------------------------------------------------------------
# Components
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class DataConfig:
    dataset: Literal["fmnist", "cifar10", "cifar100", "tinyimagenet"] = "fmnist"
    # Directory holding the dataset files; None = the dataset's default (see pipeline/data.py).
    data_dir: Optional[str] = None
    # Use only the first N training / test examples (deterministic); None = the whole split.
    train_subset: Optional[int] = rng(default=None, ge=1)
    test_subset: Optional[int] = rng(default=None, ge=1)


@dataclass(frozen=True, kw_only=True)
class ClassifierTrainConfig:
    """PGD adversarial training (Madry et al.; the paper's appendix A) for datasets without a robust model."""

    epochs: int = rng(default=4, ge=1)
    batch_size: int = rng(default=128, ge=1)
    lr: float = rng(default=0.05, gt=0)
    momentum: float = rng(default=0.9, ge=0, lt=1)
    weight_decay: float = rng(default=5e-4, ge=0)
    # Threat model the classifier is trained against (L-inf, [0,1] pixel space).
    eps: float = rng(default=0.1, gt=0, le=1)
    pgd_steps: int = rng(default=7, ge=1)
    pgd_step_size: float = rng(default=0.025, gt=0)
    # The PGD attack used to report the trained classifier's robust test accuracy.
    eval_pgd_steps: int = rng(default=20, ge=1)
    eval_pgd_step_size: float = rng(default=0.01, gt=0)
    eval_batch_size: int = rng(default=500, ge=1)
    seed: int = 0


@dataclass(frozen=True, kw_only=True)
class ClassifierConfig:
    # "cnn" (SmallCNN) or "wrn-D-W": a WideResNet of depth D (6n+4) and width W (RobustBench's names;
    # wrn-28-10 is the paper's). Checked at load time (pipeline.models.arch_problem).
    arch: str = "cnn"
    # WRN activation: RobustBench's DM models use swish (SiLU) or relu.
    activation: Literal["relu", "swish"] = "relu"
    # Where the weights come from: trained by the `classifier` stage, a RobustBench model, or a local file.
    source: Literal["train", "robustbench", "file"] = "train"
    robustbench_name: Optional[str] = None
    path: Optional[str] = None
    train: ClassifierTrainConfig = field(default_factory=ClassifierTrainConfig)


@dataclass(frozen=True, kw_only=True)
class AttackConfig:
    """Training-set attacks for the purifier (section 4.4, Table 12). Not the evaluation threat model."""

    # L-inf bound in [0,1] pixel space. FGSM and PGD run at eps/2 and at eps.
    eps: float = rng(default=8 / 255, gt=0, le=1)
    # "pixel": eps as written (the paper's text). "std": eps divided by the mean per-channel std of the
    # dataset, as the authors' public code does (about 4x larger on CIFAR-10).
    eps_scaling: Literal["pixel", "std"] = "pixel"
    pgd_steps: int = rng(default=40, ge=1)
    pgd_step_size: float = rng(default=0.01, gt=0)
    pgd_random_start: bool = True
    # Attack only the first N training examples (of the data.train_subset); None = all of them.
    n_examples: Optional[int] = rng(default=None, ge=1)
    batch_size: int = rng(default=250, ge=1)
    # Source examples per WebDataset shard (each holds 5 samples per example: clean + 4 attacks).
    shard_size: int = rng(default=1000, ge=1)
    seed: int = 0
    # Opt-in bfloat16 autocast (pipeline/precision.py); float32 by default (and then absent from the store key).
    precision: Literal["float32", "bfloat16"] = "float32"


@dataclass(frozen=True, kw_only=True)
class ActivationsConfig:
    # Hooked classifier layers; None = the architecture's default list (Table 5 for WRN-28-10).
    layers: Optional[list[str]] = None
    dtype: Literal["float16", "float32"] = "float16"
    # Zarr chunk length along N; must divide N_KINDS (5) * attack.shard_size.
    chunk_rows: int = rng(default=1000, ge=1)
    clevel: int = rng(default=3, ge=1, le=9)
    batch_size: int = rng(default=250, ge=1)
    # Opt-in bfloat16 autocast (pipeline/precision.py); float32 by default (and then absent from the store key).
    precision: Literal["float32", "bfloat16"] = "float32"


@dataclass(frozen=True, kw_only=True)
class PurifierConfig:
    """The conditional-VAE purifier and its training (appendix E, Tables 4-11, 13, 14)."""

    fc_repr: int = rng(default=512, ge=1)
    f_joint: int = rng(default=128, ge=1)
    # Convolutions per layerwise encoder: 3 (Table 6, scenarios a/b) or 4 (Table 7, scenario c).
    encoder_convs: int = rng(default=3, ge=3, le=4)
    # Subset of the cached layers to condition on; None = every cached layer.
    layers: Optional[list[str]] = None
    activations_source: Literal["cache", "recompute"] = "cache"
    epochs: int = rng(default=200, ge=1)
    warmup_epochs: int = rng(default=25, ge=0)
    plateau_epochs: int = rng(default=25, ge=0)
    anneal_epochs: int = rng(default=150, ge=0)
    initial_lr: float = rng(default=5e-9, gt=0)
    plateau_lr: float = rng(default=0.064, gt=0)
    final_lr: float = rng(default=4.346e-4, gt=0)
    beta_start_epoch: int = rng(default=25, ge=0)
    beta_end_epoch: int = rng(default=34, ge=0)
    # The KL weight reached at beta_end_epoch. Table 14: 1 (the plain VAE loss); anything else departs from the
    # paper (a beta-VAE weight, e.g. against posterior collapse) and is labelled so in docs/results.md.
    beta_max: float = rng(default=1.0, gt=0)
    # Global batch (all workers together) and the adversarial share of each batch.
    batch_size: int = rng(default=5120, ge=1)
    adv_fraction: float = rng(default=0.5, ge=0, le=1)
    radam_betas: tuple[float, float] = (0.9, 0.999)
    radam_eps: float = rng(default=1e-8, gt=0)
    lookahead_alpha: float = rng(default=0.8, gt=0, le=1)
    lookahead_k: int = rng(default=6, ge=1)
    workers: int = rng(default=1, ge=1)
    seed: int = 0
    # Opt-in bfloat16 autocast (pipeline/precision.py); float32 by default (and then absent from the store key).
    precision: Literal["float32", "bfloat16"] = "float32"


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """Evaluation threat model and attack strengths (section 5.1, Table 12)."""

    eps: float = rng(default=8 / 255, gt=0, le=1)
    # The evaluated test points are [first_example, first_example + n_examples): tune on one range, report another.
    first_example: int = rng(default=0, ge=0)
    n_examples: Optional[int] = rng(default=None, ge=1)
    samples: int = rng(default=8, ge=1)
    aggregation: Literal["robust", "logit", "prob"] = "robust"
    aa_steps: int = rng(default=100, ge=1)
    aa_eot: int = rng(default=20, ge=1)
    pgd_eot_steps: int = rng(default=200, ge=1)
    pgd_eot_step_size: float = rng(default=0.007, gt=0)
    pgd_eot_iters: int = rng(default=20, ge=1)
    # Also run PGD+EOT through logit aggregation as a surrogate (its cross-entropy never saturates), scoring
    # the points it finds on the defence as configured (eval.aggregation).
    pgd_eot_logit_surrogate: bool = False
    obfuscation_eps: float = rng(default=0.95, gt=0, le=1)
    fresh_draws: int = rng(default=5, ge=1)
    backend: Literal["pyautoattack", "autoattack"] = "pyautoattack"
    chunk_size: int = rng(default=500, ge=1)
    batch_size: int = rng(default=250, ge=1)
    seed: int = 0
    # The evaluation stays float32 unless asked: a bfloat16 figure is labelled as such in the report.
    precision: Literal["float32", "bfloat16"] = "float32"
    # How CARSO's networks run (pipeline/defense.py; the classifier-alone baseline always runs as stored):
    # "reference" as written; "fast": channels-last layout and the purifier's BatchNorms folded into the layers
    # before them: the same float32 function, its sums in another order.
    kernels: Literal["reference", "fast"] = "fast"


@dataclass(frozen=True, kw_only=True)
class ProbesConfig:
    """Linear probes of the hooked layers (pipeline/probes.py, stage `probes`): how much class information each
    layer of the frozen classifier keeps, clean and under attack, for a readout fitted on the cached training
    activations (transfer probe) and for one adversarially trained through the frozen layers (robust probe)."""

    # Subset of the cached layers (activations.layers); None = every cached layer.
    layers: Optional[list[str]] = None
    # The scored test points [first_example, first_example + n_examples): not the reported points 0-199.
    first_example: int = rng(default=5000, ge=0)
    n_examples: int = rng(default=1000, ge=1)
    # L-inf bound of every probe attack (training and scoring); None = eval.eps (the threat model).
    eps: Optional[float] = rng(default=None, gt=0, le=1)
    # The scoring attack (transfer: against the classifier alone; adaptive: against each probe through the frozen
    # layers): Table 12's PGD.
    pgd_steps: int = rng(default=40, ge=1)
    pgd_step_size: float = rng(default=0.01, gt=0)
    # Transfer probes: fitted on every cached training row (clean and the four attacks).
    transfer: bool = True
    epochs: int = rng(default=5, ge=1)
    # Robust probes: Madry adversarial training of the readout alone on the first robust_examples training images.
    robust: bool = True
    robust_examples: int = rng(default=5000, ge=1)
    robust_epochs: int = rng(default=2, ge=1)
    robust_pgd_steps: int = rng(default=7, ge=1)
    robust_pgd_step_size: float = rng(default=0.035, gt=0)
    lr: float = rng(default=1e-3, gt=0)
    weight_decay: float = rng(default=0.0, ge=0)
    batch_size: int = rng(default=256, ge=1)
    seed: int = 0


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    name: str = "run"
    data: DataConfig = field(default_factory=DataConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    activations: ActivationsConfig = field(default_factory=ActivationsConfig)
    purifier: PurifierConfig = field(default_factory=PurifierConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    probes: ProbesConfig = field(default_factory=ProbesConfig)


# --------------------------------------------------------------------------------------------------
# Building and validating
# --------------------------------------------------------------------------------------------------
def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(value: Any, tp, key: str, source: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widen to float, lists to tuples)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key, source)
    if origin is Literal:
        if value not in args:
            raise ConfigError(source, key, f"must be one of {', '.join(map(repr, args))} (got {value!r})")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(source, key, f"must be a list (got {type(value).__name__})")
        return [_coerce(v, args[0], f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(source, key, f"must be a list of {len(args)} numbers (got {value!r})")
        return tuple(_coerce(v, a, f"{key}[{i}]", source) for i, (v, a) in enumerate(zip(value, args)))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(source, key, f"must be a mapping (got {type(value).__name__})")
        return build(tp, value, source=source, prefix=f"{key}.")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(source, key, f"must be true or false (got {value!r})")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(source, key, f"must be an integer (got {value!r})")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(source, key, f"must be a number (got {value!r})")
        if not math.isfinite(value):
            raise ConfigError(source, key, f"must be a finite number (got {value!r})")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(source, key, f"must be a string (got {value!r})")
        return value
    raise ConfigError(source, key, f"unsupported type {_type_name(tp)}")  # pragma: no cover


def _check_range(value, meta, key: str, source: str) -> None:
    if value is None or not meta:
        return
    for op, bound, ok in (("> ", meta.get("gt"), lambda v, b: v > b), (">= ", meta.get("ge"), lambda v, b: v >= b),
                          ("< ", meta.get("lt"), lambda v, b: v < b), ("<= ", meta.get("le"), lambda v, b: v <= b)):
        if bound is not None and not ok(value, bound):
            raise ConfigError(source, key, f"must be {op}{bound:g} (got {value!r})")


def build(cls, raw: dict, *, source: str = "", prefix: str = ""):
    """Build dataclass ``cls`` from a plain mapping, rejecting unknown keys, wrong types and bad ranges."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for k in raw:
        if k not in fields:
            raise ConfigError(source, f"{prefix}{k}", f"unknown key (valid keys: {', '.join(fields)})")
    kwargs = {}
    for name, f in fields.items():
        if name not in raw:
            continue
        key = f"{prefix}{name}"
        value = _coerce(raw[name], hints[name], key, source)
        _check_range(value, f.metadata, key, source)
        kwargs[name] = value
    obj = cls(**kwargs)
    _cross_checks(obj, source, prefix)
    return obj


def _cross_checks(obj, source: str, prefix: str) -> None:
    """Constraints that involve more than one field."""
    if isinstance(obj, ClassifierConfig):
        from .models import arch_problem  # the models own the names they build

        problem = arch_problem(obj.arch)
        if problem:
            raise ConfigError(source, f"{prefix}arch", problem)
        if obj.arch == "cnn" and obj.activation != "relu":
            raise ConfigError(source, f"{prefix}activation", f"'{obj.activation}' applies to wrn-D-W classifiers; the "
                              "SmallCNN (arch cnn) is built with ReLU only")
        if obj.source == "robustbench" and not obj.robustbench_name:
            raise ConfigError(source, f"{prefix}robustbench_name", "required when classifier.source is 'robustbench'")
        if obj.source == "file" and not obj.path:
            raise ConfigError(source, f"{prefix}path", "required when classifier.source is 'file'")
    if isinstance(obj, PurifierConfig):
        if obj.beta_end_epoch < obj.beta_start_epoch:
            raise ConfigError(source, f"{prefix}beta_end_epoch", "must be >= purifier.beta_start_epoch")
        total = obj.warmup_epochs + obj.plateau_epochs + obj.anneal_epochs
        if total > obj.epochs:
            raise ConfigError(source, f"{prefix}anneal_epochs",
                              f"warm-up + plateau + annealing = {total} exceeds purifier.epochs = {obj.epochs}")
    if isinstance(obj, ProbesConfig) and not (obj.transfer or obj.robust):
        raise ConfigError(source, f"{prefix}robust", "probes.transfer and probes.robust are both false: no probe to fit")
    if isinstance(obj, RunConfig):
        rows = N_KINDS * obj.attack.shard_size
        if rows % obj.activations.chunk_rows:
            raise ConfigError(source, "activations.chunk_rows", f"must divide {N_KINDS} * attack.shard_size = {rows} "
                              f"(the stored kinds per example x examples per shard; got {obj.activations.chunk_rows})")


# --------------------------------------------------------------------------------------------------
# Files and overrides
# --------------------------------------------------------------------------------------------------
def parse_override(text: str) -> tuple[str, Any]:
    """``a.b=c`` -> (``a.b``, YAML-parsed ``c``)."""
    if "=" not in text:
        raise ConfigError("--set", text, "expected key=value")
    key, _, value = text.partition("=")
    key = key.strip()
    if not key:
        raise ConfigError("--set", text, "empty key")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    return key, parsed


def _apply_override(raw: dict, key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError("--set", key, f"'{part}' is not a section")
        node = child
    node[parts[-1]] = value


def read_yaml(path: str | Path, what: str = "config file"):
    """Parse a YAML file; ConfigError (one line naming the file) when it is missing, unreadable, not text or not
    YAML."""
    path, source = Path(path), str(path)
    if not path.is_file():
        raise ConfigError(source, "", f"{what} not found")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(source, "", f"not a text (UTF-8) YAML file: undecodable byte at offset {exc.start}") from None
    except OSError as exc:
        raise ConfigError(source, "", f"cannot read the {what} ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(source, "", f"invalid YAML{where}") from None


BASE_KEY = "base"  # a config's parent file: ``base: fmnist.yaml`` (relative to the config's own folder)


def _merge(base: dict, child: dict) -> dict:
    """``child`` over ``base``: sections merge key by key, any other value (a list too) replaces the base's."""
    out = dict(base)
    for k, v in child.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_config_tree(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict:
    """A config file as one mapping: its ``base`` chain read first and the file's own keys merged over it.
    ConfigError (one line naming the file) for a missing or unreadable base, a base that is not a file name,
    or a cycle."""
    path, source = Path(path), str(path)
    raw = read_yaml(path) or {}
    if not isinstance(raw, dict):
        raise ConfigError(source, "", "top level must be a mapping")
    base = raw.pop(BASE_KEY, None)
    if base is None:
        return raw
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(source, BASE_KEY, "must be the path of another config file, relative to this one's folder")
    base_path = path.parent / base
    chain = (*_chain, path.resolve())
    if base_path.resolve() in chain:
        names = " -> ".join(str(p.name) for p in (*chain, base_path.resolve()))
        raise ConfigError(source, BASE_KEY, f"the base chain is a cycle ({names})")
    if not base_path.is_file():
        raise ConfigError(source, BASE_KEY, f"{base_path}: base config file not found")
    return _merge(read_config_tree(base_path, chain), raw)


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Load a YAML config file (with its ``base`` chain) and apply ``key=value`` overrides; raise ConfigError on
    any problem."""
    source = str(path)
    raw = read_config_tree(path)
    cfg = build(RunConfig, raw, source=source)
    if overrides:
        for text in overrides:
            key, value = parse_override(text)
            _apply_override(raw, key, value)
        cfg = build(RunConfig, raw, source=f"{source} (with --set)")
    return cfg


def to_dict(obj) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(obj)))


def fingerprint(*parts: Any) -> str:
    """A short, stable hash of JSON-serialisable parts (used for store keys)."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
