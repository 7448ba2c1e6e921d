"""Training the purifier, one step and one epoch at a time (plain PyTorch: no Ray, no files; section 4.4,
Table 14). The purifier stage (stages/purifier.py) adds only the Ray Train glue: DDP, the all-reduce of the
epoch's sums, checkpoints in the store and the report.

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

import time
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn as nn

from .balanced import ShardLoader
from .config import PurifierConfig
from .models import StoredClassifier
from .models.hooks import forward_with_activations
from .models.purifier import PurifierSpec, vae_loss
from .precision import autocast
from .schedules import beta_at, lr_at

ACTIVE_KL = 0.01  # nats: a latent dimension whose average KL exceeds this carries information


@dataclass(frozen=True, kw_only=True)
class TrainJob:
    """Everything a training worker needs, fixed by the driver before launch (it crosses to Ray Train's workers
    as one object): the settings, the model, where the data and the output live, how the data is dealt."""
    purifier: PurifierConfig
    model: PurifierSpec
    source: str                       # purifier.activations_source: "cache" or "recompute"
    attacks_dir: str
    out_dir: str
    examples_per_shard: tuple[int, ...]
    steps: int                        # optimiser steps per epoch (every worker takes the same number)
    threads: int                      # torch threads per worker
    buffer_examples: int              # examples each worker holds to draw its balanced batches from
    cache_bytes: int                  # loaded shards kept in memory up to this size
    dtype: str                        # activations' storage dtype (the conditioning is cast to it either way)
    act_precision: str                # activations.precision, for recomputed activations
    activations_dir: str | None = None            # source "cache"
    classifier: StoredClassifier | None = None    # source "recompute"

    @property
    def layers(self) -> list[str]:
        return self.model.layers

    def shard_loader(self) -> ShardLoader:
        return ShardLoader(attacks_dir=self.attacks_dir, layers=self.layers, cache_bytes=self.cache_bytes,
                           activations_dir=self.activations_dir if self.source == "cache" else None)


def build_optimizer(model: nn.Module, p):
    """RAdam + Lookahead from a ``PurifierConfig`` (Table 14); the LR is set per epoch by the schedule."""
    from pytorch_optimizer import Lookahead  # imported here: it takes about a second, and most commands never train

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


def slow_state_dict(model: nn.Module, opt) -> dict[str, torch.Tensor]:
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


def conditioning(batch, classifier, layers, dtype, device, precision="float32"):
    """Activations for the batch: the cached rows, or the frozen classifier's on the stored inputs, cast to
    the cache dtype (the same function either way)."""
    if batch.acts is not None:
        return [torch.from_numpy(batch.acts[n]).to(device) for n in layers]
    with torch.no_grad(), autocast(precision, device):
        _, acts = forward_with_activations(classifier, torch.from_numpy(batch.inputs).to(device), layers)
    return [a.to(getattr(torch, dtype)) for a in acts]


def train_epoch(model: nn.Module, opt: torch.optim.Optimizer, batches: Iterator, epoch: int, p, device, *,
                layers: list[str], dtype: str, classifier: nn.Module | None = None,
                act_precision: str = "float32") -> dict[str, torch.Tensor]:
    """One epoch over ``batches`` (pipeline.balanced.Batch) at the epoch's LR and KL weight (``PurifierConfig``
    ``p``'s schedules). Returns this worker's float64 sums, to be all-reduced across workers before
    ``epoch_record``: ``totals`` = (loss x n, reconstruction x n, KL x n, n, seconds waited on data) and
    ``kl_dims`` = the KL of every latent dimension, summed over the examples."""
    beta = beta_at(epoch, p)
    for g in opt.param_groups:
        g["lr"] = lr_at(epoch, p)
    model.train()
    totals = torch.zeros(5, dtype=torch.float64)
    kl_dims = torch.zeros(p.f_joint, dtype=torch.float64)
    while True:
        tw = time.perf_counter()
        batch = next(batches, None)
        totals[4] += time.perf_counter() - tw
        if batch is None:
            break
        acts = conditioning(batch, classifier, layers, dtype, device, act_precision)
        st = train_step(model, opt, torch.from_numpy(batch.inputs).to(device),
                        torch.from_numpy(batch.targets).to(device), acts, beta, p.precision)
        totals[:4] += torch.tensor([st.loss * st.n, st.reconstruction * st.n, st.kl * st.n, st.n],
                                   dtype=torch.float64)
        kl_dims += st.kl_dims
    return {"totals": totals, "kl_dims": kl_dims}


def epoch_record(sums: dict[str, torch.Tensor], epoch: int, p, seconds: float, workers: int) -> dict:
    """The metrics line of an epoch (metrics.jsonl) from the all-reduced sums of ``train_epoch``."""
    t, kl_dims = sums["totals"], sums["kl_dims"]
    n = max(t[3].item(), 1.0)
    rec = {"epoch": epoch + 1, "loss": t[0].item() / n, "reconstruction": t[1].item() / n, "kl": t[2].item() / n,
           "beta": beta_at(epoch, p), "lr": lr_at(epoch, p), "examples": int(t[3].item()),
           "examples_per_s": t[3].item() / seconds, "seconds": seconds, "workers": workers,
           "data_wait_s": t[4].item() / workers, "kl_per_dim": [round(v, 5) for v in (kl_dims / n).tolist()]}
    rec["active_units"] = active_units(rec["kl_per_dim"])
    return rec
