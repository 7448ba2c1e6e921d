"""Robustness evaluation of one chunk of test points (plain PyTorch + pyautoattack; no Ray, no files).

Per chunk, with the attack settings written next to every number:
- clean accuracy of the classifier alone, and of CARSO over ``fresh_draws`` independent forward passes;
- standard AutoAttack (APGD-CE, APGD-T, FAB-T, Square) on the classifier alone;
- AutoAttack's version for randomised defences (APGD-CE + APGD-DLR, EOT) on CARSO, end to end;
- PGD+EOT on CARSO (Table 12);
- the gradient-obfuscation check: the same randomised AutoAttack at eps = ``obfuscation_eps``;
- before the attacks, cheap diagnostics of the purifier (``diagnostics``): purification of PGD examples
  crafted against the classifier alone (the paper's appendix C question), and how stochastic CARSO is (do the
  N reconstructions of a clean input disagree in prediction; per-pixel std across them).

Scoring cannot flatter the defence: a point misclassified on its clean input is never robust; adversarial
points returned by an attack are re-scored on ``fresh_draws`` new forward passes of the stochastic defence
(the per-draw mean and the worst case are reported beside AutoAttack's own single-pass verdict); the input
gradient at the start of each attack is checked for NaN and all-zero values.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from .attacks import pgd, pgd_eot
from .errors import UserError
from .defense import Carso

class EvalError(UserError):
    """An evaluation setting that cannot be honoured here (e.g. a backend that is not installed)."""


def check_backend(backend: str) -> None:
    if backend == "autoattack":
        try:
            import autoattack  # noqa: F401
        except ImportError:
            raise EvalError("eval.backend=autoattack: the official AutoAttack package is not importable; install it "
                            "with pip install git+https://github.com/fra31/auto-attack (it is not on PyPI), or use "
                            "eval.backend=pyautoattack (the same attack code, packaged)") from None


# The paper's strength (section 5.1 and Table 12). Anything weaker is labelled "reduced strength".
PAPER_STRENGTH = {"aa_steps": 100, "aa_eot": 20, "pgd_eot_steps": 200, "pgd_eot_iters": 20}


def reduced_settings(ev) -> dict:
    """Settings below the paper's strength, as {name: (used, paper)}."""
    out = {k: (getattr(ev, k), v) for k, v in PAPER_STRENGTH.items() if getattr(ev, k) < v}
    if ev.pgd_eot_step_size != 0.007:
        out["pgd_eot_step_size"] = (ev.pgd_eot_step_size, 0.007)
    if getattr(ev, "precision", "float32") != "float32":  # bfloat16 gradients: labelled, never the paper's figure
        out["precision"] = (ev.precision, "float32")
    return out


@contextmanager
def captured_warnings(logger_name: str = "auto-attack"):
    """Collect WARNING-and-above records of a logger (AutoAttack's runtime checks) into a list."""
    records: list[str] = []

    class _H(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    h = _H(level=logging.WARNING)
    log = logging.getLogger(logger_name)
    log.addHandler(h)
    try:
        yield records
    finally:
        log.removeHandler(h)


@torch.no_grad()
def predict(model, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([model(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])


def fresh_draws(model, x: torch.Tensor, y: torch.Tensor, draws: int, batch_size: int) -> torch.Tensor:
    """(draws, n) correctness of ``draws`` independent forward passes."""
    return torch.stack([predict(model, x, batch_size) == y for _ in range(draws)])


def gradient_diagnostics(model, x: torch.Tensor, y: torch.Tensor) -> dict:
    """Share of points whose cross-entropy input gradient (one pass) is NaN somewhere, or exactly zero."""
    xr = x.detach().clone().requires_grad_(True)
    loss = F.cross_entropy(model(xr), y, reduction="sum")
    (g,) = torch.autograd.grad(loss, xr)
    flat = g.flatten(1)
    return {"nan": int(torch.isnan(flat).any(1).sum()), "zero": int((flat == 0).all(1).sum()), "n": len(x)}


def autoattack(model, x, y, *, version: str, eps: float, seed: int, batch_size: int, device: str,
               steps: int = 100, eot: int = 20, backend: str = "pyautoattack"):
    """AutoAttack's runner. 'rand': APGD-CE + APGD-DLR, 1 restart, ``steps`` steps, ``eot`` EOT iterations.
    'standard': APGD-CE, APGD-T (9 targets), FAB-T, Square (5000 queries), at the library's settings.
    ``backend``: 'pyautoattack' (PyPI, keyword-only runner) or 'autoattack' (the official repository's package).
    Returns (x_adv, the runner's own final predictions, captured warnings, settings)."""
    check_backend(backend)
    if backend == "autoattack":
        from autoattack import AutoAttack as Official  # type: ignore

        aa = Official(model, norm="Linf", eps=eps, version=version, device=device, seed=seed)
    else:
        from pyautoattack import AutoAttack

        aa = AutoAttack(model, version=version, eps=eps, norm="Linf", seed=seed, device=device)
    if version == "rand":
        aa.apgd.n_iter, aa.apgd.eot_iter = steps, eot
    with captured_warnings() as warns:
        if backend == "autoattack":
            x_adv, y_adv = aa.run_standard_evaluation(x, y, bs=batch_size, return_labels=True)
        else:
            x_adv, y_adv = aa.run_standard_evaluation(x, y, batch_size=batch_size)
    settings = {"library": backend, "version": version, "norm": "Linf", "eps": eps, "seed": seed,
                "attacks": list(aa.attacks_to_run)}
    if version == "rand":
        settings |= {"steps": aa.apgd.n_iter, "eot": aa.apgd.eot_iter, "restarts": aa.apgd.n_restarts}
    else:
        settings |= {"apgd_steps": aa.apgd.n_iter, "apgd_t_targets": aa.apgd_targeted.n_target_classes,
                     "fab_t_targets": aa.fab.n_target_classes, "square_queries": aa.square.n_queries}
    return x_adv.detach(), y_adv.detach(), warns, settings


# Table 12's PGD (the purifier's training attack), run against the classifier alone for the purification check.
PURIFICATION_PGD = {"steps": 40, "step_size": 0.01}


@torch.no_grad()
def stochasticity(carso, x: torch.Tensor, batch_size: int) -> dict:
    """Per point: do the predictions on its N reconstructions disagree, and the per-pixel std across the N
    reconstructions (averaged over pixels and channels)."""
    disagree, pixel_std = [], []
    for i in range(0, len(x), batch_size):
        rec = carso.reconstructions(x[i:i + batch_size])                       # (N, B, C, H, W)
        pred = carso.classifier(rec.flatten(0, 1)).argmax(1).view(rec.shape[:2])
        disagree += (pred != pred[0]).any(0).int().tolist()
        pixel_std += rec.std(0, unbiased=False).flatten(1).mean(1).tolist()
    return {"disagree": disagree, "pixel_std": pixel_std}


def diagnostics(classifier, carso, x: torch.Tensor, y: torch.Tensor, ev, seed: int) -> dict:
    """Purification (classifier and CARSO on PGD examples crafted against the classifier alone) and stochasticity
    (on the clean inputs), per point."""
    gen = torch.Generator().manual_seed(seed + 3)
    xp = pgd(classifier, x, y, eps=ev.eps, generator=gen, **PURIFICATION_PGD)
    return {"clf_pgd": (predict(classifier, xp, ev.batch_size) == y).int().tolist(),
            "carso_pgd": fresh_draws(carso, xp, y, ev.fresh_draws, ev.batch_size).int().tolist(),
            **stochasticity(carso, x, ev.batch_size),
            "settings": {"attack": "PGD against the classifier alone", "norm": "Linf", "eps": ev.eps,
                         **PURIFICATION_PGD, "random_start": True, "loss": "CE", "seed": seed + 3}}


def _scored(model, x_adv, y, clean_ok, ev) -> dict:
    """Per-point outcomes of adversarial points: the fresh-draw correctness (and clean correctness)."""
    draws = fresh_draws(model, x_adv, y, ev.fresh_draws, ev.batch_size) & clean_ok
    return {"fresh": draws.int().tolist()}


def classifier_baseline(classifier, x: torch.Tensor, y: torch.Tensor, ev, seed: int, device: str) -> dict:
    """The classifier alone: clean accuracy and standard AutoAttack, per point. It depends only on the classifier,
    the points, eps, the seed and the backend, never on the purifier or the aggregation, so the evaluate stage
    computes it once and reuses it across a sweep's purifiers."""
    x, y = x.to(device), y.to(device)
    xa, ya, warns, settings = autoattack(classifier, x, y, version="standard", eps=ev.eps, seed=seed,
                                         batch_size=ev.batch_size, device=device, backend=ev.backend)
    return {"clf_clean": (predict(classifier, x, ev.batch_size) == y).int().tolist(),
            "clf_aa": {"runner": (ya == y).int().tolist(), "warnings": warns, "settings": settings}}


def evaluate_chunk(classifier, carso, x: torch.Tensor, y: torch.Tensor, ev, seed: int, device: str,
                   keep_examples: int = 0, baseline: dict | None = None) -> dict:
    """All evaluations of one chunk. Returns JSON-serialisable per-point outcomes and settings. ``baseline``:
    the chunk's ``classifier_baseline`` when already known (it is computed here otherwise)."""
    x, y = x.to(device), y.to(device)
    out: dict = {"n": len(y), "seed": seed}
    out.update(baseline if baseline is not None else classifier_baseline(classifier, x, y, ev, seed, device))
    torch.manual_seed(seed)
    carso_clean = fresh_draws(carso, x, y, ev.fresh_draws, ev.batch_size)
    out["carso_clean"] = carso_clean.int().tolist()
    clean_ok = carso_clean.all(0)  # a point any clean draw gets wrong counts as not robust
    out["carso_clean_ok"] = clean_ok.int().tolist()
    out["diagnostics"] = diagnostics(classifier, carso, x, y, ev, seed)

    torch.manual_seed(seed + 5)  # randAA's own clean pass draws from the global generator
    xa, ya, warns, settings = autoattack(carso, x, y, version="rand", eps=ev.eps, seed=seed, batch_size=ev.batch_size,
                                         device=device, steps=ev.aa_steps, eot=ev.aa_eot, backend=ev.backend)
    out["carso_randaa"] = {"runner": ((ya == y) & clean_ok).int().tolist(), **_scored(carso, xa, y, clean_ok, ev),
                           "warnings": warns, "settings": settings, "grad_at_start": gradient_diagnostics(carso, x, y)}
    if keep_examples:
        k = min(keep_examples, len(y))
        with torch.no_grad():
            recon_clean, recon_adv = carso.reconstructions(x[:k]), carso.reconstructions(xa[:k])
        out["examples"] = {"x": x[:k].cpu(), "x_adv": xa[:k].cpu(), "recon": recon_adv[0].cpu(),
                           "recon_clean_all": recon_clean.cpu(), "recon_adv_all": recon_adv.cpu()}

    torch.manual_seed(seed + 1)
    gen = torch.Generator().manual_seed(seed + 2)
    xp = pgd_eot(carso, x, y, eps=ev.eps, steps=ev.pgd_eot_steps, step_size=ev.pgd_eot_step_size,
                 eot=ev.pgd_eot_iters, generator=gen)
    pgd_settings = {"attack": "PGD+EOT", "norm": "Linf", "eps": ev.eps, "steps": ev.pgd_eot_steps,
                    "step_size": ev.pgd_eot_step_size, "eot": ev.pgd_eot_iters, "random_start": True, "loss": "CE"}
    out["carso_pgd_eot"] = {**_scored(carso, xp, y, clean_ok, ev), "settings": {**pgd_settings, "seed": seed + 2}}
    if ev.pgd_eot_logit_surrogate:
        # Gradients through logit aggregation (never saturated), points scored on the defence as configured.
        surrogate = Carso(carso.classifier, carso.purifier, carso.layers, samples=carso.samples, aggregation="logit")
        gen = torch.Generator().manual_seed(seed + 4)
        xs = pgd_eot(surrogate, x, y, eps=ev.eps, steps=ev.pgd_eot_steps, step_size=ev.pgd_eot_step_size,
                     eot=ev.pgd_eot_iters, generator=gen)
        out["carso_pgd_eot_logit"] = {**_scored(carso, xs, y, clean_ok, ev),
                                      "settings": {**pgd_settings, "gradient_through": "logit aggregation",
                                                   "seed": seed + 4}}

    xo, yo, warns, settings = autoattack(carso, x, y, version="rand", eps=ev.obfuscation_eps, seed=seed,
                                         batch_size=ev.batch_size, device=device, steps=ev.aa_steps, eot=ev.aa_eot,
                                         backend=ev.backend)
    out["obfuscation"] = {"runner": ((yo == y) & clean_ok).int().tolist(), **_scored(carso, xo, y, clean_ok, ev),
                          "warnings": warns, "settings": settings}
    return out
