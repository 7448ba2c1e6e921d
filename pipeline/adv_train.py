"""PGD adversarial training of a classifier (Madry et al.; the paper's appendix A), plain PyTorch.

Each step replaces the batch by its PGD adversarial examples (generated with the model in eval mode, so
BatchNorm statistics are not polluted by the attack's probing) and takes an SGD step on them. The learning
rate follows a cosine schedule over all steps.
"""
from __future__ import annotations

import math
import time
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attacks import pgd
from .data import to_float
from .log import human_rate, human_seconds

# Seconds between progress lines inside an epoch (a WRN epoch on CPU takes a quarter of an hour); runs shorter
# than that print only their per-epoch lines.
PROGRESS_EVERY_S = 60.0


def build_sgd(model: nn.Module, *, lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=True)


def adversarial_step(model: nn.Module, opt: torch.optim.Optimizer, xb: torch.Tensor, yb: torch.Tensor, *, eps: float,
                     pgd_steps: int, pgd_step_size: float, generator: torch.Generator | None = None):
    """One step of adversarial training: the batch's PGD examples (model in eval mode), then an SGD step on them
    (train mode). Returns (loss, logits). ``pipeline.calibrate`` times this same function."""
    model.eval()
    xa = pgd(model, xb, yb, eps=eps, steps=pgd_steps, step_size=pgd_step_size, generator=generator)
    model.train()
    logits = model(xa)
    loss = F.cross_entropy(logits, yb)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss, logits


def adversarial_train(model: nn.Module, x_u8: torch.Tensor, y: torch.Tensor, *, epochs: int, batch_size: int,
                      lr: float, momentum: float, weight_decay: float, eps: float, pgd_steps: int,
                      pgd_step_size: float, seed: int, device: str = "cpu",
                      log: Callable[[str], None] = print) -> list[dict]:
    model.to(device)
    opt = build_sgd(model, lr=lr, momentum=momentum, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(x_u8) / batch_size)
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    gen = torch.Generator().manual_seed(seed)
    history = []
    start = last = time.perf_counter()
    for epoch in range(epochs):
        t0, seen, loss_sum, correct = time.perf_counter(), 0, 0.0, 0
        order = torch.randperm(len(x_u8), generator=gen)
        for step in range(steps_per_epoch):
            idx = order[step * batch_size:(step + 1) * batch_size]
            xb, yb = to_float(x_u8[idx]).to(device), y[idx].to(device)
            loss, logits = adversarial_step(model, opt, xb, yb, eps=eps, pgd_steps=pgd_steps,
                                            pgd_step_size=pgd_step_size, generator=gen)
            sched.step()
            seen += len(idx)
            loss_sum += loss.item() * len(idx)
            correct += (logits.argmax(1) == yb).sum().item()
            now = time.perf_counter()
            if now - last >= PROGRESS_EVERY_S and step + 1 < steps_per_epoch:
                last, done = now, epoch * len(x_u8) + seen
                rate = done / (now - start)
                log(f"[classifier] epoch {epoch + 1}/{epochs}: {seen}/{len(x_u8)} examples | "
                    f"{human_rate(rate, 'examples')} | training ETA {human_seconds((epochs * len(x_u8) - done) / rate)}")
        rec = {"epoch": epoch + 1, "adv_loss": loss_sum / seen, "adv_train_acc": correct / seen,
               "seconds": time.perf_counter() - t0, "lr": sched.get_last_lr()[0]}
        history.append(rec)
        log(f"[classifier] epoch {epoch + 1}/{epochs}: adversarial loss {rec['adv_loss']:.4f}, "
            f"adversarial train acc {rec['adv_train_acc']:.4f}, {seen / rec['seconds']:.0f} ex/s")
    model.eval()
    return history


@torch.no_grad()
def _predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).argmax(1)


def accuracy_under_pgd(model: nn.Module, x_u8: torch.Tensor, y: torch.Tensor, *, eps: float, steps: int,
                       step_size: float, batch_size: int, seed: int = 0, device: str = "cpu",
                       log: Callable[[str], None] | None = None) -> dict:
    """Clean accuracy and PGD robust accuracy (random start) of ``model`` on the given examples; with ``log``, a
    progress line every ``PROGRESS_EVERY_S`` seconds."""
    model.eval().to(device)
    gen = torch.Generator().manual_seed(seed)
    clean = robust = 0
    start = last = time.perf_counter()
    for i in range(0, len(x_u8), batch_size):
        now = time.perf_counter()
        if log is not None and i > 0 and now - last >= PROGRESS_EVERY_S:
            last, rate = now, i / (now - start)
            log(f"[classifier] PGD-{steps} test accuracy: {i}/{len(x_u8)} examples | {human_rate(rate, 'examples')} | "
                f"ETA {human_seconds((len(x_u8) - i) / rate)}")
        xb, yb = to_float(x_u8[i:i + batch_size]).to(device), y[i:i + batch_size].to(device)
        ok = _predict(model, xb) == yb
        xa = pgd(model, xb, yb, eps=eps, steps=steps, step_size=step_size, generator=gen)
        clean += ok.sum().item()
        robust += (ok & (_predict(model, xa) == yb)).sum().item()
    n = len(x_u8)
    return {"n": n, "clean_acc": clean / n, "pgd_acc": robust / n,
            "attack": {"name": "PGD", "norm": "Linf", "eps": eps, "steps": steps, "step_size": step_size,
                       "random_start": True, "loss": "CE", "restarts": 1}}
