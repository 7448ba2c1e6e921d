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

Every attack is an object with one interface, as in the official AutoAttack: a ``name`` (the key of its results),
its settings as fields, and ``run(model, x, y) -> Adversarial`` (the points, plus the runner's own verdict and
warnings where the library gives them). ``carso_attacks`` lists the attacks on CARSO in the order they run;
``evaluate_chunk`` scores each one the same way.

Scoring cannot flatter the defence: a point misclassified on its clean input is never robust; adversarial
points returned by an attack are re-scored on ``fresh_draws`` new forward passes of the stochastic defence
(the per-draw mean and the worst case are reported beside AutoAttack's own single-pass verdict); the input
gradient at the start of each attack is checked for NaN and all-zero values.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from pyautoattack import AutoAttack

from .attacks import pgd, pgd_eot
from .defense import Carso
from .errors import UserError


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


@dataclass(frozen=True)
class Adversarial:
    """What an attack returns: the adversarial points, and for AutoAttack its own single-pass predictions on them
    (``runner``), the runtime-check warnings it logged and the settings it ran with (read off the library)."""
    x: torch.Tensor
    settings: dict
    runner: torch.Tensor | None = None
    warnings: list[str] | None = None


@dataclass(frozen=True, kw_only=True)
class AutoAttackRun:
    """AutoAttack's runner. 'rand': APGD-CE + APGD-DLR, 1 restart, ``steps`` steps, ``eot`` EOT iterations.
    'standard': APGD-CE, APGD-T (9 targets), FAB-T, Square (5000 queries), at the library's settings.
    ``backend``: 'pyautoattack' (PyPI, keyword-only runner) or 'autoattack' (the official repository's package).
    ``global_seed``: reset torch's global generator first (the runner's clean pass of a stochastic defence draws
    from it); None leaves it as it is."""
    name: str
    version: str
    eps: float
    seed: int
    batch_size: int
    device: str
    backend: str = "pyautoattack"
    steps: int = 100
    eot: int = 20
    global_seed: int | None = None
    check_gradient_at_start: bool = False

    def run(self, model, x: torch.Tensor, y: torch.Tensor) -> Adversarial:
        check_backend(self.backend)
        if self.global_seed is not None:
            torch.manual_seed(self.global_seed)
        if self.backend == "autoattack":
            from autoattack import AutoAttack as Official  # type: ignore  # optional, not on PyPI

            aa = Official(model, norm="Linf", eps=self.eps, version=self.version, device=self.device, seed=self.seed)
        else:
            aa = AutoAttack(model, version=self.version, eps=self.eps, norm="Linf", seed=self.seed, device=self.device)
        if self.version == "rand":
            aa.apgd.n_iter, aa.apgd.eot_iter = self.steps, self.eot
        with captured_warnings() as warns:
            if self.backend == "autoattack":
                x_adv, y_adv = aa.run_standard_evaluation(x, y, bs=self.batch_size, return_labels=True)
            else:
                x_adv, y_adv = aa.run_standard_evaluation(x, y, batch_size=self.batch_size)
        settings = {"library": self.backend, "version": self.version, "norm": "Linf", "eps": self.eps, "seed": self.seed,
                    "attacks": list(aa.attacks_to_run)}
        if self.version == "rand":
            settings |= {"steps": aa.apgd.n_iter, "eot": aa.apgd.eot_iter, "restarts": aa.apgd.n_restarts}
        else:
            settings |= {"apgd_steps": aa.apgd.n_iter, "apgd_t_targets": aa.apgd_targeted.n_target_classes,
                         "fab_t_targets": aa.fab.n_target_classes, "square_queries": aa.square.n_queries}
        return Adversarial(x_adv.detach(), settings, runner=y_adv.detach(), warnings=warns)


@dataclass(frozen=True, kw_only=True)
class PGDEOTRun:
    """Table 12's PGD+EOT (``steps`` signed steps of ``step_size``, gradient averaged over ``eot`` draws, a
    random start drawn from a generator seeded with ``seed``). ``gradient_through``: attack a copy of the defence
    that aggregates this way instead (a surrogate whose cross-entropy never saturates); the points are scored on
    the defence as given all the same."""
    name: str
    eps: float
    steps: int
    step_size: float
    eot: int
    seed: int
    global_seed: int | None = None
    gradient_through: str | None = None
    check_gradient_at_start: bool = False

    def run(self, model, x: torch.Tensor, y: torch.Tensor) -> Adversarial:
        if self.global_seed is not None:
            torch.manual_seed(self.global_seed)
        target = model
        if self.gradient_through is not None:
            target = Carso(model.classifier, model.purifier, model.layers, samples=model.samples,
                           aggregation=self.gradient_through, precision=model.precision,
                           kernels=model.kernels)
        gen = torch.Generator().manual_seed(self.seed)
        x_adv = pgd_eot(target, x, y, eps=self.eps, steps=self.steps, step_size=self.step_size, eot=self.eot,
                        generator=gen)
        settings = {"attack": "PGD+EOT", "norm": "Linf", "eps": self.eps, "steps": self.steps,
                    "step_size": self.step_size, "eot": self.eot, "random_start": True, "loss": "CE"}
        if self.gradient_through is not None:
            settings["gradient_through"] = f"{self.gradient_through} aggregation"
        return Adversarial(x_adv, settings | {"seed": self.seed})


# What each of a chunk's random streams adds to the chunk's seed (every offset below SEED_STRIDE of
# stages/evaluate.py, so two chunks never share a stream). Changing one re-seeds every stored evaluation.
SEED_OFFSETS = {"randaa": 0, "pgd_eot_global": 1, "pgd_eot": 2, "purification": 3, "pgd_eot_logit": 4,
                "randaa_global": 5}


@dataclass(frozen=True)
class CarsoAttack:
    """One attack on CARSO in the evaluation, listed once in ``CARSO_ATTACKS`` (in the order the attacks run).
    Everything downstream comes from that list, as AutoAttack loops over ``attacks_to_run``: each chunk's record
    (under ``name``), its entry in results.json (``result``), the summary, report.md, the running line and the
    sweep's columns. Adding an attack is one entry here (and its config keys).

    - ``make(ev, seeds, device)``: the attack object (``run(model, x, y) -> Adversarial``, ``name``,
      ``check_gradient_at_start``) or None where the config turns it off; ``seeds`` is the chunk seed plus
      ``SEED_OFFSETS`` by name.
    - ``label``: a robustness number's name in the summary (``<label> fresh mean`` / ``fresh worst``, and
      ``<label>`` itself for the runner's score when ``runner``; ``worst``: also the points right on every
      fresh pass); None for a check (the obfuscation check).
    - ``describe(entry, results)``: its line in report.md.
    - ``passes(ev)``: CARSO input gradients per point at most (``pipeline plan``'s FLOPs and hours); 0 where it is
      off.
    - ``share(attacked)``: the expected fraction of ``passes`` it runs, given the ``Attacked`` fractions (None: all
      of them). AutoAttack's runner attacks only the points still classified correctly: APGD-CE those right on
      clean inputs, APGD-DLR those APGD-CE left.
    """

    name: str
    make: Callable
    describe: Callable
    passes: Callable
    label: str | None = None
    share: Callable | None = None
    runner: bool = False
    worst: bool = True
    result: str | None = None  # results.json key; default: ``name``

    @property
    def key(self) -> str:
        return self.result or self.name


def _aa(ev, seeds: dict, device: str) -> dict:
    return {"version": "rand", "seed": seeds["randaa"], "batch_size": ev.batch_size, "device": device,
            "backend": ev.backend, "steps": ev.aa_steps, "eot": ev.aa_eot}


def _pgd(ev) -> dict:
    return {"eps": ev.eps, "steps": ev.pgd_eot_steps, "step_size": ev.pgd_eot_step_size, "eot": ev.pgd_eot_iters}


def _aa_passes(ev) -> int:
    return 2 * ev.aa_steps * ev.aa_eot  # randAA: APGD-CE and APGD-DLR, each steps x EOT gradients


def _pgd_passes(ev) -> int:
    return ev.pgd_eot_steps * ev.pgd_eot_iters


@dataclass(frozen=True)
class Attacked:
    """The fractions of the evaluated points each stage of AutoAttack's runner expects to attack (``pipeline
    plan`` takes them from the classifier's test accuracies when its stage is done): ``clean`` right on clean
    inputs (APGD-CE, and standard AutoAttack's APGD-CE), ``robust`` still right after the first attack (APGD-DLR;
    standard AutoAttack's APGD-T, FAB-T and Square), ``chance`` still right at the obfuscation check's eps (its
    APGD-DLR: at most chance, or the check fails)."""
    clean: float = 1.0
    robust: float = 1.0
    chance: float = 1.0


def carso_passes(ev, attacked: Attacked | None = None) -> float:
    """CARSO input gradients per evaluated point, over every attack the config runs: at most (``attacked`` None), or
    expected when the runner attacks the ``attacked`` fractions."""
    return sum(a.passes(ev) * (a.share(attacked) if attacked and a.share else 1) for a in CARSO_ATTACKS)


def pct(v: float) -> str:
    return f"{100 * v:.2f}%"


def _describe_randaa(e: dict, r: dict) -> str:
    st, fr = e["settings"], e["fresh"]
    return (f"- C/randAA: CARSO end to end, AutoAttack 'rand' ({', '.join(st['attacks'])}, {st['steps']} steps, EOT "
            f"{st['eot']}, {st['restarts']} restart), as the runner scores it (one stochastic pass). Re-scored on "
            f"{fr['draws']} fresh passes: mean {pct(fr['mean'])}, worst pass {pct(fr['worst_draw'])}, points right on "
            f"every pass {pct(fr['per_point_worst'])}.")


def _describe_pgd_eot(e: dict, r: dict) -> str:
    st, fr = e["settings"], e["fresh"]
    if "gradient_through" in st:
        return (f"- PGD+EOT with its gradient through {st['gradient_through']} (same settings), the points scored on "
                f"the {r['aggregation']} aggregation: fresh mean {pct(fr['mean'])}, points right on every pass "
                f"{pct(fr['per_point_worst'])}.")
    return (f"- PGD+EOT: {st['steps']} steps of {st['step_size']:g}, EOT {st['eot']}, CE, random start; fresh passes: "
            f"mean {pct(fr['mean'])}, points right on every pass {pct(fr['per_point_worst'])}.")


def _describe_obfuscation(e: dict, r: dict) -> str:
    return (f"- Gradient-obfuscation check: the same randAA at eps {e['settings']['eps']:g}: runner {pct(e['runner'])}, "
            f"fresh mean {pct(e['fresh']['mean'])}, chance {pct(e['chance'])}: "
            f"**{'passed' if e['passed'] else 'FAILED'}**.")


CARSO_ATTACKS: list[CarsoAttack] = [
    CarsoAttack("carso_randaa", label="C/randAA", runner=True, describe=_describe_randaa, passes=_aa_passes,
                share=lambda a: (a.clean + a.robust) / 2,
                make=lambda ev, s, device: AutoAttackRun(name="carso_randaa", eps=ev.eps, global_seed=s["randaa_global"],
                                                         check_gradient_at_start=True, **_aa(ev, s, device))),
    CarsoAttack("carso_pgd_eot", label="PGD+EOT", describe=_describe_pgd_eot, passes=_pgd_passes,
                make=lambda ev, s, device: PGDEOTRun(name="carso_pgd_eot", seed=s["pgd_eot"],
                                                     global_seed=s["pgd_eot_global"], **_pgd(ev))),
    CarsoAttack("carso_pgd_eot_logit", label="PGD+EOT (logit surrogate)", describe=_describe_pgd_eot, worst=False,
                passes=lambda ev: _pgd_passes(ev) if ev.pgd_eot_logit_surrogate else 0,
                make=lambda ev, s, device: PGDEOTRun(name="carso_pgd_eot_logit", seed=s["pgd_eot_logit"],
                                                     gradient_through="logit", **_pgd(ev))
                if ev.pgd_eot_logit_surrogate else None),
    CarsoAttack("obfuscation", result="obfuscation_check", describe=_describe_obfuscation, passes=_aa_passes,
                share=lambda a: (a.clean + a.chance) / 2,
                make=lambda ev, s, device: AutoAttackRun(name="obfuscation", eps=ev.obfuscation_eps,
                                                         **_aa(ev, s, device))),
]


def carso_attacks(ev, seed: int, device: str) -> list:
    """The attacks on CARSO of one chunk, in the order they run (each result is stored under the attack's name):
    ``CARSO_ATTACKS`` that the config turns on, randAA at eps, PGD+EOT, optionally PGD+EOT through logit
    aggregation, and randAA at ``obfuscation_eps`` (the gradient-obfuscation check). The seeds are fixed
    functions of the chunk's seed."""
    seeds = {name: seed + offset for name, offset in SEED_OFFSETS.items()}
    return [a for a in (spec.make(ev, seeds, device) for spec in CARSO_ATTACKS) if a is not None]


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
    seed = seed + SEED_OFFSETS["purification"]
    gen = torch.Generator().manual_seed(seed)
    xp = pgd(classifier, x, y, eps=ev.eps, generator=gen, **PURIFICATION_PGD)
    return {"clf_pgd": (predict(classifier, xp, ev.batch_size) == y).int().tolist(),
            "carso_pgd": fresh_draws(carso, xp, y, ev.fresh_draws, ev.batch_size).int().tolist(),
            **stochasticity(carso, x, ev.batch_size),
            "settings": {"attack": "PGD against the classifier alone", "norm": "Linf", "eps": ev.eps,
                         **PURIFICATION_PGD, "random_start": True, "loss": "CE", "seed": seed}}


def _scored(model, x_adv, y, clean_ok, ev) -> dict:
    """Per-point outcomes of adversarial points: the fresh-draw correctness (and clean correctness)."""
    draws = fresh_draws(model, x_adv, y, ev.fresh_draws, ev.batch_size) & clean_ok
    return {"fresh": draws.int().tolist()}


def classifier_baseline(classifier, x: torch.Tensor, y: torch.Tensor, ev, seed: int, device: str) -> dict:
    """The classifier alone: clean accuracy and standard AutoAttack, per point. It depends only on the classifier,
    the points, eps, the seed and the backend, never on the purifier or the aggregation, so the evaluate stage
    computes it once and reuses it across a sweep's purifiers."""
    x, y = x.to(device), y.to(device)
    adv = AutoAttackRun(name="clf_aa", version="standard", eps=ev.eps, seed=seed, batch_size=ev.batch_size,
                        device=device, backend=ev.backend).run(classifier, x, y)
    return {"clf_clean": (predict(classifier, x, ev.batch_size) == y).int().tolist(),
            "clf_aa": {"runner": (adv.runner == y).int().tolist(), "warnings": adv.warnings, "settings": adv.settings}}


def evaluate_chunk(classifier, carso, x: torch.Tensor, y: torch.Tensor, ev, seed: int, device: str,
                   keep_examples: int = 0, baseline: dict | None = None,
                   done: Callable[[str], None] = lambda what: None) -> dict:
    """All evaluations of one chunk. Returns JSON-serialisable per-point outcomes and settings. ``baseline``:
    the chunk's ``classifier_baseline`` when already known (it is computed here otherwise). ``keep_examples``:
    also return that many points' inputs, randAA points and reconstructions (for the report's figures).
    ``done(what)`` is called after each part (progress: a WRN's chunk runs for most of an hour on a CPU core)."""
    x, y = x.to(device), y.to(device)
    out: dict = {"n": len(y), "seed": seed}
    if baseline is None:
        baseline = classifier_baseline(classifier, x, y, ev, seed, device)
        done("the classifier's standard AutoAttack")
    out.update(baseline)
    torch.manual_seed(seed)
    carso_clean = fresh_draws(carso, x, y, ev.fresh_draws, ev.batch_size)
    out["carso_clean"] = carso_clean.int().tolist()
    clean_ok = carso_clean.all(0)  # a point any clean draw gets wrong counts as not robust
    out["carso_clean_ok"] = clean_ok.int().tolist()
    out["diagnostics"] = diagnostics(classifier, carso, x, y, ev, seed)
    done("CARSO's clean draws and the diagnostics")
    labels = {a.name: a.label or f"{a.name} check (randAA at eps {ev.obfuscation_eps:g})" for a in CARSO_ATTACKS}
    for i, attack in enumerate(carso_attacks(ev, seed, device)):
        adv = attack.run(carso, x, y)
        rec: dict = {} if adv.runner is None else {"runner": ((adv.runner == y) & clean_ok).int().tolist()}
        rec |= _scored(carso, adv.x, y, clean_ok, ev)
        if adv.warnings is not None:
            rec["warnings"] = adv.warnings
        rec["settings"] = adv.settings
        if attack.check_gradient_at_start:
            rec["grad_at_start"] = gradient_diagnostics(carso, x, y)
        out[attack.name] = rec
        if i == 0 and keep_examples:  # the first attack's points (randAA) illustrate the report
            out["examples"] = _examples(carso, x, adv.x, keep_examples)
        done(labels.get(attack.name, attack.name))
    return out


@torch.no_grad()
def _examples(carso, x: torch.Tensor, x_adv: torch.Tensor, k: int) -> dict:
    k = min(k, len(x))
    recon_clean, recon_adv = carso.reconstructions(x[:k]), carso.reconstructions(x_adv[:k])
    return {"x": x[:k].cpu(), "x_adv": x_adv[:k].cpu(), "recon": recon_adv[0].cpu(),
            "recon_clean_all": recon_clean.cpu(), "recon_adv_all": recon_adv.cpu()}
