"""Linear probes of a frozen classifier's hooked layers: how much class information each layer holds, clean and
under attack (the stage `probes`, stages/probes.py). Plain PyTorch.

A probe is multinomial logistic regression on a layer's flattened activation (standardised by fixed per-feature
statistics). Two kinds:

- **Transfer probe** (``fit_linear_probe``): fitted on stored, frozen activations, e.g. the activations stage's
  training rows (clean inputs and FGSM/PGD examples crafted against the *classifier*). It measures how linearly
  decodable the class is from the layer *for the inputs it was shown*.
- **Robust probe** (``fit_robust_probe``): adversarially trained (Madry et al.): every minibatch is replaced by
  PGD examples crafted against the probe itself, through the frozen layers up to its layer (``ProbedClassifier``),
  before the probe takes its step. It measures how much class information the layer holds that a linear readout
  can keep *against an attacker who knows that readout*.

Each probe is scored (``score_probe``) on test points: ``clean``; ``transfer``, PGD examples crafted against the
classifier alone (``classifier_scores``; the same points for every layer), read by the probe; and ``adaptive``,
PGD crafted against the probe itself through the frozen layers.

The adaptive score of the robust probe is the figure that matters. A transfer probe fitted on attacks crafted
against the classifier can learn to decode the attack's own signature (the perturbation pattern PGD leaves in the
layer and which correlates with the true class, since the attack pushes away from it): it then shows a high
transfer accuracy, even above the classifier's own PGD accuracy, and still collapses to near zero once the attack
targets the probe. Only an attack against the readout itself bounds what the layer holds against an adversary,
and only a readout trained against such attacks gives that bound a fair chance.

Conventions (shared by every function):

- Inputs are images in [0, 1], NCHW, on any device; everything runs on the device of the tensors / model given
  and in batches of ``batch_size``.
- The classifier's weights and mode are never changed: each function puts it in eval mode with its parameters
  frozen (``requires_grad`` False) for its duration and restores every module's ``training`` flag and every
  parameter's ``requires_grad`` on exit. (A ``ProbedClassifier`` built directly by the caller freezes the classifier
  and puts it in eval mode for good.)
- Probes start from zero weights (logistic regression is convex, so nothing is lost), so the seed alone decides a
  fit: it orders the shuffled minibatches (``torch.Generator(seed)``) and, for the robust probe, draws every PGD
  random start. Deterministic for a given seed on CPU.
- Optimiser: Adam at a constant ``lr``; ``weight_decay`` is a coupled L2 penalty (Adam's ``weight_decay``) on the
  weight matrix only, not the bias.
- Standardisation: per-feature mean and (population) std, streamed over the training features in float64; the
  std is floored at ``max(STD_FLOOR_REL * mean(std), STD_FLOOR_ABS)``, so a (nearly) constant feature such as a
  zero-padded border is amplified at most 1/STD_FLOOR_REL times more than a typical one and never divides by ~0.
- Attack scores count a point as robust only if the readout is right on both the clean point and its PGD example
  (as ``pipeline.adv_train.accuracy_under_pgd`` and AutoAttack do: the clean point is in the eps-ball too);
  ``transfer`` is the plain accuracy on the given transfer inputs.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attacks import pgd
from .models.hooks import check_layers

# std floor: relative to the mean per-feature std of the layer, with an absolute floor for an all-constant layer.
STD_FLOOR_REL = 1e-2
STD_FLOOR_ABS = 1e-6


# --------------------------------------------------------------------------------------------------
# The probe
# --------------------------------------------------------------------------------------------------
class LinearProbe(nn.Module):
    """Multinomial logistic regression on a layer's flattened activation: standardisation by fixed per-feature
    mean/std buffers (fitted on the training features), then nn.Linear(dim, num_classes). forward(acts) takes the
    activation tensor in the layer's own shape (N, ...) and returns logits (float32, whatever the activation's
    dtype). The linear layer starts at zero."""

    def __init__(self, dim: int, num_classes: int, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        mean = torch.as_tensor(mean, dtype=torch.float32).reshape(-1)
        std = torch.as_tensor(std, dtype=torch.float32).reshape(-1)
        if mean.numel() != dim or std.numel() != dim:
            raise ValueError(f"mean/std must have {dim} entries (got {mean.numel()} and {std.numel()})")
        if not bool((std > 0).all()):
            raise ValueError("std must be positive (floor it)")
        self.register_buffer("mean", mean.clone())
        self.register_buffer("std", std.clone())
        self.linear = nn.Linear(dim, num_classes, device=mean.device)
        with torch.no_grad():
            self.linear.weight.zero_()
            self.linear.bias.zero_()
        self.dim, self.num_classes = dim, num_classes

    def forward(self, acts: torch.Tensor) -> torch.Tensor:
        z = acts.flatten(1)
        if z.shape[1] != self.dim:
            raise ValueError(f"activation has {z.shape[1]} features per example, the probe expects {self.dim}")
        return self.linear((z.to(self.mean.dtype) - self.mean) / self.std)


def _moments(batches: Iterable[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and floored population std of a stream of (B, ...) batches (Chan et al.'s pairwise
    combination of per-batch centred sums, in float64), as float32."""
    n, mean, m2 = 0, None, None
    for b in batches:
        b = b.flatten(1).to(torch.float32)
        nb = b.shape[0]
        if nb == 0:
            continue
        mb = b.mean(0)
        m2b = ((b - mb) ** 2).sum(0).double()
        mb = mb.double()
        if mean is None:
            n, mean, m2 = nb, mb, m2b
        else:
            tot = n + nb
            delta = mb - mean
            mean = mean + delta * (nb / tot)
            m2 = m2 + m2b + delta ** 2 * (n * nb / tot)
            n = tot
    if mean is None:
        raise ValueError("no training features")
    std = (m2 / n).sqrt()
    floor = max(STD_FLOOR_REL * std.mean().item(), STD_FLOOR_ABS)
    return mean.float(), std.clamp_min(floor).float()


def _adam(probe: LinearProbe, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.Adam([{"params": [probe.linear.weight], "weight_decay": weight_decay},
                             {"params": [probe.linear.bias], "weight_decay": 0.0}], lr=lr)


def _steps(n: int, batch_size: int) -> int:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 (got {batch_size})")
    return (n + batch_size - 1) // batch_size


def fit_linear_probe(feats: torch.Tensor, labels: torch.Tensor, num_classes: int, *, epochs: int, batch_size: int,
                     lr: float, weight_decay: float, seed: int,
                     log: Callable[[str], None] | None = None) -> LinearProbe:
    """Transfer probe: fit on stored (frozen) activations ``feats`` (N, ...) of any float dtype, e.g. float16 from
    the store: each minibatch is cast to float32 on its own, the whole array never is. Standardisation statistics
    from ``feats`` (streamed, floored; module docstring), then ``epochs`` epochs of Adam on shuffled minibatches
    (order from ``torch.Generator().manual_seed(seed)``). The probe lives on ``feats.device``."""
    n = len(feats)
    if len(labels) != n:
        raise ValueError(f"{n} feature rows but {len(labels)} labels")
    steps = _steps(n, batch_size)
    device = feats.device
    labels = labels.to(device).long()
    mean, std = _moments(feats[i:i + batch_size] for i in range(0, n, batch_size))
    probe = LinearProbe(mean.numel(), num_classes, mean.to(device), std.to(device))
    opt = _adam(probe, lr, weight_decay)
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        order = torch.randperm(n, generator=gen).to(device)
        loss_sum, correct = 0.0, 0
        for step in range(steps):
            idx = order[step * batch_size:(step + 1) * batch_size]
            yb = labels[idx]
            logits = probe(feats[idx].to(torch.float32))
            loss = F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.item() * len(idx)
            correct += (logits.argmax(1) == yb).sum().item()
        if log is not None:
            log(f"[probes] transfer probe epoch {epoch + 1}/{epochs}: loss {loss_sum / n:.4f}, "
                f"train acc {correct / n:.4f}")
    return probe


# --------------------------------------------------------------------------------------------------
# The frozen classifier up to a layer
# --------------------------------------------------------------------------------------------------
class _StopForward(Exception):
    """Raised by the hook on the probed layer to end the classifier's forward right after that layer."""

    def __init__(self, out: torch.Tensor):
        super().__init__()
        self.out = out


def _raise_output(_module, _inputs, out):
    raise _StopForward(out)


def _forward_to(classifier: nn.Module, module: nn.Module, layer: str, x: torch.Tensor) -> torch.Tensor:
    """The output of ``module`` (named ``layer``) for inputs ``x``; the classifier's layers above it never run."""
    handle = module.register_forward_hook(_raise_output)
    try:
        classifier(x)
    except _StopForward as stop:
        out = stop.out
    else:
        raise RuntimeError(f"layer {layer!r} was not called by the classifier's forward")
    finally:
        handle.remove()
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"layer {layer!r} returns {type(out).__name__}, not a tensor")
    return out


def _module(classifier: nn.Module, layer: str) -> nn.Module:
    check_layers(classifier, [layer])
    return dict(classifier.named_modules())[layer]


@contextmanager
def _frozen(classifier: nn.Module):
    """Eval mode and frozen parameters for the block's duration; every module's ``training`` flag and every
    parameter's ``requires_grad`` restored on exit."""
    modes = [(m, m.training) for m in classifier.modules()]
    flags = [(p, p.requires_grad) for p in classifier.parameters()]
    classifier.eval().requires_grad_(False)
    try:
        yield classifier
    finally:
        for m, mode in modes:
            m.training = mode
        for p, flag in flags:
            p.requires_grad_(flag)


class ProbedClassifier(nn.Module):
    """The frozen classifier up to ``layer`` followed by ``probe``: forward(x) -> probe logits. Runs the
    classifier's forward with a hook on ``layer`` that ends it right after that layer (a private exception raised
    by the hook and caught here), so the layers above cost nothing. Gradients flow to x (for attacks) and to the
    probe's parameters (for training); the classifier's parameters are frozen (requires_grad False, set here) and
    it stays in eval mode (``train()`` applies to the probe only)."""

    def __init__(self, classifier: nn.Module, layer: str, probe: LinearProbe):
        super().__init__()
        target = _module(classifier, layer)  # also checks the name
        object.__setattr__(self, "_target", target)  # not a second child: no duplicate state_dict keys
        classifier.eval().requires_grad_(False)
        self.classifier, self.layer, self.probe = classifier, layer, probe

    def train(self, mode: bool = True):
        super().train(mode)
        self.classifier.eval()
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return _forward_to(self.classifier, self._target, self.layer, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.probe(self.features(x))


def _feature_batches(classifier: nn.Module, layer: str, x: torch.Tensor, batch_size: int):
    module = _module(classifier, layer)
    _steps(1, batch_size)
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            yield _forward_to(classifier, module, layer, x[i:i + batch_size]).detach()


def layer_features(classifier: nn.Module, layer: str, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """no_grad activations of ``layer`` for inputs ``x`` (N, ...), computed in batches, each forward stopped right
    after the layer; on the classifier's device, in the layer's dtype."""
    with _frozen(classifier):
        return torch.cat(list(_feature_batches(classifier, layer, x, batch_size)))


# --------------------------------------------------------------------------------------------------
# The robust probe
# --------------------------------------------------------------------------------------------------
def _step_seed(seed: int, step: int) -> int:
    """The seed of the PGD random starts of training step ``step`` (global over epochs)."""
    return (seed * 1_000_003 + step) % (2 ** 63)


def fit_robust_probe(classifier: nn.Module, layer: str, x: torch.Tensor, y: torch.Tensor, num_classes: int, *,
                     eps: float, steps: int, step_size: float, epochs: int, batch_size: int, lr: float,
                     weight_decay: float, seed: int, log: Callable[[str], None] | None = None) -> LinearProbe:
    """Robust probe, adversarially trained (Madry et al.) on images ``x`` in [0, 1] with labels ``y``: each shuffled
    minibatch (order from ``torch.Generator().manual_seed(seed)``) is replaced by its PGD examples (L-inf ``eps``,
    ``steps`` steps of ``step_size``, uniform random start drawn from a generator seeded by (seed, global step))
    crafted against ``ProbedClassifier`` (the probe as it stands, through the frozen layers up to ``layer``), then
    the probe takes an Adam step on the attacked batch. Standardisation statistics from the clean training
    features (``layer_features``, streamed). The probe lives on the classifier's device."""
    n = len(x)
    if len(y) != n:
        raise ValueError(f"{n} images but {len(y)} labels")
    y = y.to(x.device).long()
    with _frozen(classifier):
        mean, std = _moments(_feature_batches(classifier, layer, x, batch_size))
        probe = LinearProbe(mean.numel(), num_classes, mean, std)
        model = ProbedClassifier(classifier, layer, probe)
        opt = _adam(probe, lr, weight_decay)
        gen = torch.Generator().manual_seed(seed)
        n_steps, step_no = _steps(n, batch_size), 0
        with torch.enable_grad():
            for epoch in range(epochs):
                order = torch.randperm(n, generator=gen).to(x.device)
                loss_sum, correct = 0.0, 0
                for step in range(n_steps):
                    idx = order[step * batch_size:(step + 1) * batch_size]
                    xb, yb = x[idx], y[idx]
                    start = torch.Generator().manual_seed(_step_seed(seed, step_no))
                    xa = pgd(model, xb, yb, eps=eps, steps=steps, step_size=step_size, generator=start)
                    with torch.no_grad():
                        acts = model.features(xa)
                    logits = probe(acts)
                    loss = F.cross_entropy(logits, yb)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    step_no += 1
                    loss_sum += loss.item() * len(idx)
                    correct += (logits.argmax(1) == yb).sum().item()
                if log is not None:
                    log(f"[probes] robust probe ({layer}) epoch {epoch + 1}/{epochs}: adversarial loss "
                        f"{loss_sum / n:.4f}, adversarial train acc {correct / n:.4f}")
    return probe


# --------------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------------
def _predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).argmax(1)


def score_probe(classifier: nn.Module, layer: str, probe: LinearProbe, x: torch.Tensor, y: torch.Tensor,
                x_transfer: torch.Tensor, *, eps: float, steps: int, step_size: float, seed: int,
                batch_size: int) -> dict:
    """Accuracy of ``probe`` (on ``layer``) on test points ``x``/``y``: ``clean`` (x); ``transfer`` (plain accuracy
    on ``x_transfer``, PGD examples crafted against the classifier alone, given by the caller and shared across
    layers: ``classifier_scores``); ``adaptive`` (right on x and on PGD crafted against ``ProbedClassifier`` itself,
    L-inf eps, ``steps`` x ``step_size``, uniform random start from ``torch.Generator().manual_seed(seed)``,
    drawn batch after batch). Returns {"clean", "transfer", "adaptive": fractions in [0, 1], "n": int}."""
    n = len(x)
    if len(y) != n or len(x_transfer) != n:
        raise ValueError(f"{n} points but {len(y)} labels and {len(x_transfer)} transfer inputs")
    _steps(1, batch_size)
    y = y.to(x.device).long()
    clean = transfer = adaptive = 0
    with _frozen(classifier):
        model = ProbedClassifier(classifier, layer, probe)
        gen = torch.Generator().manual_seed(seed)
        for i in range(0, n, batch_size):
            xb, yb = x[i:i + batch_size], y[i:i + batch_size]
            ok = _predict(model, xb) == yb
            transfer += (_predict(model, x_transfer[i:i + batch_size].to(xb)) == yb).sum().item()
            with torch.enable_grad():
                xa = pgd(model, xb, yb, eps=eps, steps=steps, step_size=step_size, generator=gen)
            clean += ok.sum().item()
            adaptive += (ok & (_predict(model, xa) == yb)).sum().item()
    return {"clean": clean / n, "transfer": transfer / n, "adaptive": adaptive / n, "n": n}


def classifier_scores(classifier: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, steps: int,
                      step_size: float, seed: int, batch_size: int) -> tuple[dict, torch.Tensor]:
    """The classifier's own accuracy on ``x``/``y``: {'clean', 'pgd' (right on x and on its PGD example), 'n'}, and
    the PGD examples (L-inf eps, ``steps`` x ``step_size``, uniform random start from
    ``torch.Generator().manual_seed(seed)``, batch after batch; detached, on x's device): the ``transfer`` inputs
    of every probe."""
    n = len(x)
    if len(y) != n:
        raise ValueError(f"{n} points but {len(y)} labels")
    _steps(1, batch_size)
    y = y.to(x.device).long()
    clean = robust = 0
    advs = []
    with _frozen(classifier):
        gen = torch.Generator().manual_seed(seed)
        for i in range(0, n, batch_size):
            xb, yb = x[i:i + batch_size], y[i:i + batch_size]
            ok = _predict(classifier, xb) == yb
            with torch.enable_grad():
                xa = pgd(classifier, xb, yb, eps=eps, steps=steps, step_size=step_size, generator=gen)
            clean += ok.sum().item()
            robust += (ok & (_predict(classifier, xa) == yb)).sum().item()
            advs.append(xa)
    return {"clean": clean / n, "pgd": robust / n, "n": n}, torch.cat(advs) if advs else x[:0].clone()
