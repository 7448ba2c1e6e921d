"""Classifier registry: build by architecture name, load weights safely, hash weights for store keys."""
from __future__ import annotations

import hashlib
import io
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from ..data import info
from ..errors import UserError
from ..store import atomic_write_bytes, require_intact
from .cnn import SmallCNN
from .wrn import WideResNet


class ModelError(UserError):
    """A checkpoint that cannot be found, read or matched to the architecture."""


# ``wrn-D-W``: RobustBench's DMWideResNet naming (depth D = 6n + 4, n blocks per group; width W).
WRN_NAME = re.compile(r"wrn-(\d+)-(\d+)")
ARCH_CHOICES = "'cnn' or 'wrn-D-W' (depth D = 6n+4 >= 10: 10, 16, 22, 28, 34, ...; width W >= 1, e.g. wrn-28-10)"


def arch_problem(arch: str) -> str | None:
    """Why ``arch`` names no buildable classifier (None when it does)."""
    if arch == "cnn":
        return None
    m = WRN_NAME.fullmatch(arch)
    if not m:
        return f"unknown architecture {arch!r}: valid choices are {ARCH_CHOICES}"
    depth, width = int(m.group(1)), int(m.group(2))
    if depth < 10 or (depth - 4) % 6:
        return f"{arch!r}: depth {depth} is not 6n+4 with n >= 1 (valid depths: 10, 16, 22, 28, 34, ...)"
    if width < 1:
        return f"{arch!r}: width must be >= 1"
    return None


def _build_wrn(depth: int, width: int, dataset: str, activation: str) -> nn.Module:
    meta = info(dataset)
    return WideResNet(num_classes=meta.num_classes, depth=depth, width=width, activation=activation,
                      mean=meta.mean, std=meta.std, num_input_channels=meta.channels)


def _build_cnn(dataset: str, activation: str) -> nn.Module:
    meta = info(dataset)
    return SmallCNN(num_classes=meta.num_classes, in_channels=meta.channels, mean=meta.mean, std=meta.std,
                    size=meta.size)


def build_classifier(arch: str, dataset: str, activation: str = "relu") -> nn.Module:
    """``cnn`` (SmallCNN) or ``wrn-D-W`` (any valid depth and width; ``wrn-28-10`` is the paper's)."""
    problem = arch_problem(arch)
    if problem:
        raise ModelError(f"classifier.arch: {problem}")
    if arch == "cnn":
        return _build_cnn(dataset, activation)
    depth, width = map(int, WRN_NAME.fullmatch(arch).groups())
    return _build_wrn(depth, width, dataset, activation)


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint with ``weights_only=True`` (no arbitrary unpickling). Accepts a bare state_dict or
    a dict holding one under 'state_dict' / 'model' (the common checkpoint layouts)."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: checkpoint not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"{path}: cannot read checkpoint with weights_only=True ({type(exc).__name__}: {exc})") from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelError(f"{path}: not a state_dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> nn.Module:
    """Strict load. A model whose normalisation is not part of its state_dict (the WRN, like RobustBench's)
    ignores ``mean``/``std`` entries, which checkpoints written before that change (this store's own among them)
    carry; the normalisation comes from the dataset either way."""
    expected = model.state_dict()
    state = {k: v for k, v in state.items() if k in expected or k not in ("mean", "std")}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
        raise ModelError(f"{where}: weights do not match the architecture: {first}") from None
    return model


def load_robustbench(name: str, dataset: str) -> nn.Module:
    """Load a model through the optional ``robustbench`` package (needs network access on first use)."""
    try:
        from robustbench.utils import load_model  # type: ignore
    except ImportError as exc:
        raise ModelError(f"classifier.robustbench_name={name}: the optional 'robustbench' package does not import "
                         f"({exc}); pip install robustbench (it needs torchvision), or download the checkpoint and "
                         "use classifier.source=file with classifier.path") from None
    rb_dataset = {"cifar10": "cifar10", "cifar100": "cifar100"}.get(dataset)
    if rb_dataset is None:
        raise ModelError(f"classifier.robustbench_name={name}: RobustBench has no {dataset} leaderboard; use source=file")
    try:
        return load_model(model_name=name, dataset=rb_dataset, threat_model="Linf")
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"classifier.robustbench_name={name}: RobustBench could not load it ({exc})") from None


def state_dict_hash(model: nn.Module) -> str:
    """sha256 of the weights (names, dtypes, shapes and bytes), independent of file layout."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        t = v.detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.view(torch.int16).numpy().tobytes())
    return h.hexdigest()


def save_state_dict(model: nn.Module, path: Path) -> None:
    """Atomic save: a crash never leaves a half-written checkpoint under the final name."""
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_stored(out, dataset: str) -> tuple[nn.Module, str]:
    """The classifier stage's output (``model.pt``, checked against its manifest first), in eval mode, and the
    sha256 of its weights."""
    manifest = out.manifest()
    rec = next(r for r in manifest["files"] if r["name"] == "model.pt")
    require_intact(out, rec)
    model = build_classifier(manifest["arch"], dataset, manifest["activation"])
    load_weights(model, load_state_dict_file(out.dir / "model.pt"), str(out.dir / "model.pt"))
    return model.eval(), manifest["weights_sha256"]


@dataclass(frozen=True)
class StoredClassifier:
    """What a Ray actor or task needs to rebuild the stored classifier on any node: arch, activation, dataset and
    weights (with their sha256). ``build(device)`` returns it in eval mode."""
    arch: str
    activation: str
    dataset: str
    state_dict: dict = field(repr=False)
    weights_sha256: str

    def build(self, device: str = "cpu") -> nn.Module:
        model = build_classifier(self.arch, self.dataset, self.activation)
        load_weights(model, self.state_dict, f"classifier {self.weights_sha256[:16]}")
        return model.eval().to(device)


def classifier_payload(out, dataset: str) -> StoredClassifier:
    """The classifier stage's output ``out`` (checked against its manifest), ready to travel to a worker."""
    model, weights = load_stored(out, dataset)
    manifest = out.manifest()
    return StoredClassifier(arch=manifest["arch"], activation=manifest["activation"], dataset=dataset,
                            state_dict={k: v.clone() for k, v in model.state_dict().items()}, weights_sha256=weights)
