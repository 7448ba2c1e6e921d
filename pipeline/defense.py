"""CARSO at inference: one differentiable module from input pixels to aggregated log-probabilities.

    x -> classifier (hooks on the conditioning layers) -> purifier.encode_condition
      -> decoder on N draws of z ~ N(0, I) -> the same classifier on every reconstruction
      -> aggregation over the N logit vectors -> log-probabilities (usable as logits by any attack)

Aggregations (section 4.5, appendix D), all returning log P:
- ``robust``:  P_i ∝ prod_a exp(exp(l_i^a)), i.e. log P = log_softmax_i(S_i) with S_i = sum_a exp(l_i^a).
  exp(l) overflows float32 above l ~ 88 and exp(exp(l)) above l ~ 4.5, so S is formed as
  exp(m) * sum_a exp(l_i^a - m) with m the input's largest logit, and log P = S - logsumexp(S) by a stable
  log_softmax. Exact (to float32 rounding) for logits below 80; above, exp(m) is capped at exp(80), which
  keeps S finite and the arg max unchanged where the exact log P of every loser is already far below -1e30.
- ``logit``: P_i ∝ exp(mean_a l_i^a).
- ``prob``:  P_i = mean_a softmax(l^a)_i.

Everything is differentiable: BatchNorm runs in eval mode, nothing is detached, and every call draws
fresh latent samples.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .models import StoredClassifier
from .models.hooks import capture
from .models.purifier import PurifierSpec
from .precision import autocast

AGGREGATIONS = ("robust", "logit", "prob")
KERNELS = ("reference", "fast")


def robust_log_probs(logits: torch.Tensor) -> torch.Tensor:
    """``logits``: (N samples, B, C). Returns log P (B, C) of the double-exponential aggregation."""
    m = logits.amax(dim=(0, 2), keepdim=True)                       # (1, B, 1): largest logit per input
    scaled = torch.exp(logits - m).sum(dim=0)                       # S_i * exp(-m), in (0, N]
    s = scaled * torch.exp(torch.clamp(m.squeeze(0), max=80.0))     # S_i, finite in float32
    return F.log_softmax(s, dim=1)                                  # S_i - logsumexp_j S_j, stably


def aggregate(logits: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == "robust":
        return robust_log_probs(logits)
    if mode == "logit":
        return F.log_softmax(logits.mean(0), dim=1)
    if mode == "prob":
        return torch.logsumexp(F.log_softmax(logits, dim=2), dim=0) - torch.log(torch.tensor(float(logits.shape[0])))
    raise ValueError(f"unknown aggregation {mode!r} (choose from {', '.join(AGGREGATIONS)})")


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """Fold every eval-mode BatchNorm that directly follows a convolution, transposed convolution or linear layer
    in an ``nn.Sequential`` of ``module`` into that layer (BatchNorm in eval mode is an affine map per channel:
    ``w' = w * gamma / sqrt(var + eps)``, ``b' = (b - mean) * gamma / sqrt(var + eps) + beta``; torch's
    ``torch.nn.utils.fusion``), in place. The same function, rounded differently; one pass fewer over each
    activation, forward and backward."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

    for child in module.children():
        fold_batchnorm(child)
    if isinstance(module, nn.Sequential):
        names = list(module._modules)
        for a, b in zip(names, names[1:]):
            layer, bn = module._modules[a], module._modules[b]
            if isinstance(bn, (nn.BatchNorm1d, nn.BatchNorm2d)) and not bn.training and bn.track_running_stats:
                if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)) and isinstance(bn, nn.BatchNorm2d):
                    module._modules[a] = fuse_conv_bn_eval(layer, bn, transpose=isinstance(layer, nn.ConvTranspose2d))
                elif isinstance(layer, nn.Linear) and isinstance(bn, nn.BatchNorm1d):
                    module._modules[a] = fuse_linear_bn_eval(layer, bn)
                else:
                    continue
                module._modules[b] = nn.Identity()
    return module


class Carso(nn.Module):
    """classifier + purifier decoder, end to end. ``forward(x)`` returns aggregated log-probabilities."""

    def __init__(self, classifier: nn.Module, purifier: nn.Module, layers: list[str], samples: int = 8,
                 aggregation: str = "robust", precision: str = "float32", kernels: str = "reference"):
        super().__init__()
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"unknown aggregation {aggregation!r}")
        if kernels not in KERNELS:
            raise ValueError(f"unknown kernels {kernels!r} (choose from {', '.join(KERNELS)})")
        self.classifier, self.purifier = classifier.eval(), purifier.eval()
        self.layers, self.samples, self.aggregation = list(layers), samples, aggregation
        self.precision = precision  # "bfloat16": the networks under autocast, the aggregation in float32
        # "fast": the purifier's BatchNorms folded into the layers before them (a second fold finds none), both
        # networks' weights and every input channels-last. The modules passed are changed in place: pass ones no
        # one else runs.
        self.kernels = kernels
        if kernels == "fast":
            fold_batchnorm(self.purifier)
            self.classifier.to(memory_format=torch.channels_last)
            self.purifier.to(memory_format=torch.channels_last)
        for p in self.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True):  # BatchNorm stays in eval mode whatever an attack library asks
        return super().train(False)

    def reconstructions(self, x: torch.Tensor) -> torch.Tensor:
        """(samples, B, C, H, W) reconstructions of ``x`` from fresh latent draws."""
        if self.kernels == "fast":
            x = x.contiguous(memory_format=torch.channels_last)
        with capture(self.classifier, self.layers) as acts:
            self.classifier(x)
        recon = self.purifier.sample([acts[n] for n in self.layers], self.samples)
        return recon.view(self.samples, x.shape[0], *recon.shape[1:])

    def sample_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(samples, B, classes) float32 logits of the classifier on each reconstruction."""
        with autocast(self.precision, x.device):
            rec = self.reconstructions(x)
            logits = self.classifier(rec.flatten(0, 1))
        return logits.float().view(self.samples, x.shape[0], -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return aggregate(self.sample_logits(x), self.aggregation)


@dataclass(frozen=True)
class CarsoWeights:
    """A trained CARSO as it travels to an evaluation worker: the stored classifier, the purifier's architecture and
    its weights. ``build`` returns (classifier, Carso) on ``device``."""
    classifier: StoredClassifier
    purifier: PurifierSpec
    purifier_state: dict = field(repr=False)

    def build(self, device: str, *, samples: int, aggregation: str, precision: str = "float32",
              kernels: str = "reference"):
        classifier = self.classifier.build(device)
        purifier = self.purifier.build()
        purifier.load_state_dict(self.purifier_state)
        # A "fast" CARSO changes its networks: it gets a classifier of its own, and the classifier-alone baseline
        # runs the stored weights as they are.
        inner = classifier if kernels == "reference" else copy.deepcopy(classifier)
        carso = Carso(inner, purifier.to(device).eval(), self.purifier.layers, samples=samples,
                      aggregation=aggregation, precision=precision, kernels=kernels)
        return classifier, carso
