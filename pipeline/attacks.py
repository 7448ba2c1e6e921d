"""L-inf white-box attacks of the paper's Table 12, in plain PyTorch.

All attacks are untargeted, maximise the categorical cross-entropy, and keep every iterate inside the
eps-ball around ``x`` and inside [0, 1]. The model is used in whatever mode the caller set (use ``eval()``
for a classifier; a stochastic defence stays stochastic, which is what EOT averages over).

- FGSM: one signed-gradient step of size eps.
- PGD: ``steps`` signed-gradient steps of ``step_size`` from a uniform random start in the eps-ball.
- PGD+EOT: PGD whose gradient is the average over ``eot`` independent forward/backward passes.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .kinds import KINDS  # noqa: F401 - the stored kinds, in their order (re-exported: attacks.KINDS)


def _project(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.min(torch.max(x_adv, x - eps), x + eps).clamp_(0.0, 1.0)


def input_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eot: int = 1) -> torch.Tensor:
    """Gradient of the summed cross-entropy w.r.t. the input, averaged over ``eot`` forward passes."""
    grad = torch.zeros_like(x)
    for _ in range(eot):
        xr = x.detach().requires_grad_(True)
        loss = F.cross_entropy(model(xr), y, reduction="sum")
        grad += torch.autograd.grad(loss, xr)[0]
    return grad / eot


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """Fast Gradient Sign Method (Goodfellow et al.): x + eps * sign(grad), clipped to [0, 1]."""
    g = input_gradient(model, x, y)
    return _project(x + eps * g.sign(), x, eps).detach()


def uniform_start(x: torch.Tensor, eps: float, generator: torch.Generator | None = None) -> torch.Tensor:
    noise = torch.rand(x.shape, generator=generator, dtype=x.dtype, device="cpu").to(x.device)
    return (2.0 * noise - 1.0) * eps


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, steps: int, step_size: float,
        random_start: bool = True, init: torch.Tensor | None = None, generator: torch.Generator | None = None,
        eot: int = 1) -> torch.Tensor:
    """Projected Gradient Descent (Madry et al.) on the cross-entropy, with optional EOT averaging.

    ``init`` is an explicit starting perturbation (for reproducible per-example starts); otherwise a uniform
    start in the eps-ball is drawn from ``generator`` when ``random_start`` is set.
    """
    if init is not None:
        delta = init.to(x)
    elif random_start:
        delta = uniform_start(x, eps, generator)
    else:
        delta = torch.zeros_like(x)
    x_adv = _project(x + delta, x, eps)
    for _ in range(steps):
        g = input_gradient(model, x_adv, y, eot=eot)
        x_adv = _project(x_adv + step_size * g.sign(), x, eps)
    return x_adv.detach()


def pgd_eot(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, steps: int = 200,
            step_size: float = 0.007, eot: int = 20, generator: torch.Generator | None = None) -> torch.Tensor:
    """PGD+EOT as in Table 12 (200 steps of 0.007, gradient averaged over 20 draws), random start."""
    return pgd(model, x, y, eps=eps, steps=steps, step_size=step_size, random_start=True,
               generator=generator, eot=eot)


def per_example_starts(indices: torch.Tensor, shape: tuple[int, ...], eps: float, seed: int) -> torch.Tensor:
    """Uniform random starts seeded by (seed, example index): the same example always gets the same start,
    whatever batch or worker it lands in."""
    out = torch.empty((len(indices),) + tuple(shape))
    for row, idx in enumerate(indices.tolist()):
        g = torch.Generator().manual_seed(seed * 1_000_003 + int(idx))
        out[row] = (2.0 * torch.rand(shape, generator=g) - 1.0) * eps
    return out


def training_mix(model: nn.Module, x: torch.Tensor, y: torch.Tensor, indices: torch.Tensor, *, eps: float,
                 pgd_steps: int, pgd_step_size: float, random_start: bool, seed: int) -> dict[str, torch.Tensor]:
    """The purifier's training inputs for one batch: clean, FGSM eps/2, FGSM eps, PGD eps/2, PGD eps."""
    out = {"clean": x.detach().clone()}
    for kind, e in (("fgsm_half", eps / 2), ("fgsm", eps)):
        out[kind] = fgsm(model, x, y, e)
    for kind, e, salt in (("pgd_half", eps / 2, 1), ("pgd", eps, 2)):
        init = per_example_starts(indices, tuple(x.shape[1:]), e, seed * 4 + salt) if random_start else None
        out[kind] = pgd(model, x, y, eps=e, steps=pgd_steps, step_size=pgd_step_size, random_start=False,
                        init=init)
    return out
