"""Training the purifier, one step at a time (plain PyTorch: no Ray, no files; section 4.4, Table 14).

- The encoder reads the classifier's *input* (clean or adversarially perturbed), the conditioning is the
  classifier's activations of that same input, and the loss targets the *clean* image (section 4.4: "we use
  as input a mixture of clean and adversarially perturbed examples, and the clean input as the target").
- RAdam + Lookahead (alpha 0.8, k 6). Lookahead keeps slow weights that the fast ones are pulled back to every
  k steps; the purifier kept at the end of training is the slow one (``slow_state_dict``), as in the authors'
  code.
- Posterior-collapse diagnostics: the KL of every latent dimension, averaged over the data; a dimension is
  *active* when its average KL exceeds ``ACTIVE_KL`` nats.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from pytorch_optimizer import Lookahead

from .models.purifier import vae_loss
from .precision import autocast

ACTIVE_KL = 0.01  # nats: a latent dimension whose average KL exceeds this carries information


def build_optimizer(model: nn.Module, p) -> Lookahead:
    """RAdam + Lookahead from a ``PurifierConfig`` (Table 14); the LR is set per epoch by the schedule."""
    inner = torch.optim.RAdam(model.parameters(), lr=p.initial_lr, betas=tuple(p.radam_betas), eps=p.radam_eps,
                              weight_decay=0.0)
    return Lookahead(inner, k=p.lookahead_k, alpha=p.lookahead_alpha)


@dataclass
class StepStats:
    loss: float
    reconstruction: float
    kl: float
    kl_dims: torch.Tensor   # (f_joint,) KL of each latent dimension, summed over the batch
    n: int


def train_step(model: nn.Module, opt: torch.optim.Optimizer, inputs: torch.Tensor, targets: torch.Tensor,
               acts: list[torch.Tensor], beta: float, precision: str = "float32") -> StepStats:
    """One optimisation step: encode ``inputs`` with their activations ``acts``, reconstruct ``targets``. With
    ``precision='bfloat16'`` the forward runs under autocast; the loss and the optimizer stay float32."""
    with autocast(precision, inputs.device):
        x_hat, mu, logvar = model(inputs, acts)
    loss, reco, kl, kl_dims = vae_loss(x_hat.float(), targets, mu.float(), logvar.float(), beta, per_dim=True)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    n = targets.shape[0]
    return StepStats(loss.item(), reco.item(), kl.item(), kl_dims.detach().double().cpu() * n, n)


def active_units(kl_per_dim: list[float] | torch.Tensor) -> int:
    return int((torch.as_tensor(kl_per_dim) > ACTIVE_KL).sum())


def slow_state_dict(model: nn.Module, opt: Lookahead) -> dict[str, torch.Tensor]:
    """The model's state_dict with every parameter replaced by Lookahead's slow copy (buffers as they are).
    Works on a DDP-wrapped model (its ``module``)."""
    net = getattr(model, "module", model)
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    for name, p in net.named_parameters():
        slow = opt.state[p].get("slow_params")
        if slow is None:
            raise ValueError(f"Lookahead holds no slow weights for parameter {name}")
        state[name] = slow.detach().clone()
    return state
