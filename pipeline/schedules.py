"""Per-epoch schedules of the purifier's training (section 5.1, Table 14). Both are stepped once per epoch.

- Learning rate: linear warm-up from ``initial_lr`` to ``plateau_lr`` over ``warmup_epochs``, a plateau of
  ``plateau_epochs``, then linear annealing to ``final_lr`` over ``anneal_epochs`` (then held).
- KL weight beta: 0 before ``beta_start_epoch``, rising linearly to ``beta_max`` (Table 14: 1) at
  ``beta_end_epoch``, then ``beta_max``.

Epochs are counted from 0. Learning rate and global batch are the configured values whatever the number
of workers: DDP averages gradients over the global batch, so the update does not depend on how the batch is
split (Table 14's 0.064 is 1e-4 x the paper's per-GPU batch of 640; the global batch stays 5120).
"""
from __future__ import annotations


def lr_at(epoch: int, p) -> float:
    w, pl, a = p.warmup_epochs, p.plateau_epochs, p.anneal_epochs
    if epoch < w:
        return p.initial_lr + (p.plateau_lr - p.initial_lr) * epoch / w
    if epoch < w + pl:
        return p.plateau_lr
    if a and epoch < w + pl + a:
        t = (epoch - w - pl + 1) / a
        return p.plateau_lr + (p.final_lr - p.plateau_lr) * t
    return p.final_lr if a else p.plateau_lr


def beta_at(epoch: int, p) -> float:
    if epoch < p.beta_start_epoch:
        return 0.0
    if epoch >= p.beta_end_epoch:
        return p.beta_max
    return p.beta_max * (epoch - p.beta_start_epoch) / (p.beta_end_epoch - p.beta_start_epoch)
