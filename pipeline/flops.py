"""FLOPs of each stage's work, counted on the real modules (``torch.utils.flop_counter``, on the meta device: no
weights, no data) for one example and multiplied by the work the config asks for. ``pipeline plan`` prints them
with projected hours at a sustained throughput the user states.

Counted: convolutions and matrix products (what FlopCounterMode counts; elementwise work is left out, so these
are lower bounds). A "gradient pass" is a forward plus a backward to the input (attacks) or to the parameters
(training). Attack counts are upper bounds where an attack stops early on points it has already broken, unless
``work["attacked"]`` (``pipeline.evaluation.Attacked``) gives the fractions AutoAttack's runner is expected to
attack.
"""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from .data import info
from .defense import Carso
from .models import build_classifier
from .models.hooks import forward_with_activations
from .models.purifier import Purifier
from .sizing import layer_shapes

# Standard AutoAttack on the classifier, per point at most: APGD-CE 100 steps, APGD-T 9 targets x 100,
# FAB-T 9 targets x 100 (one gradient pass per step counted), Square 5000 queries (forward only).
AA_STANDARD_CE = 100
AA_STANDARD_GRAD_PASSES, AA_STANDARD_FORWARDS = AA_STANDARD_CE + 900 + 900, 5000


def _count(fn) -> int:
    with FlopCounterMode(display=False) as fc:
        fn()
    return int(fc.get_total_flops())


def per_example(cfg) -> dict[str, int]:
    """FLOPs of one example through each building block of the config's models."""
    meta = info(cfg.data.dataset)
    shapes = layer_shapes(cfg.classifier.arch, cfg.data.dataset, cfg.classifier.activation, cfg.activations.layers)
    layers = cfg.purifier.layers or list(shapes)
    if cfg.purifier.activations_source == "recompute":
        shapes = layer_shapes(cfg.classifier.arch, cfg.data.dataset, cfg.classifier.activation, layers)
    p = cfg.purifier
    with torch.device("meta"):
        clf = build_classifier(cfg.classifier.arch, cfg.data.dataset, cfg.classifier.activation)
        pur = Purifier(image_shape=(meta.channels, meta.size, meta.size), layer_shapes={n: shapes[n] for n in layers},
                       fc_repr=p.fc_repr, f_joint=p.f_joint, encoder_convs=p.encoder_convs, mean=meta.mean,
                       std=meta.std)
        x1 = torch.zeros(1, meta.channels, meta.size, meta.size)
        x2 = torch.zeros(2, meta.channels, meta.size, meta.size)  # BatchNorm in training mode needs 2 rows

    def input_grad(model):
        x = x1.clone().requires_grad_(True)
        model(x).sum().backward()

    clf.eval()
    forward = _count(lambda: clf(x1))
    clf.train()
    train = _count(lambda: clf(x1).sum().backward())
    clf.eval()
    for q in clf.parameters():
        q.requires_grad_(False)
    attack = _count(lambda: input_grad(clf))

    _, acts = forward_with_activations(clf, x2, layers)
    pur.train()
    purifier = _count(lambda: sum(t.sum() for t in pur(x2, [a.detach() for a in acts])).backward()) // 2
    carso = Carso(clf, pur, layers, samples=cfg.eval.samples, aggregation=cfg.eval.aggregation)
    carso_grad = _count(lambda: input_grad(carso))
    return {"classifier_forward": forward, "classifier_train_step": train, "classifier_input_grad": attack,
            "purifier_train_step": purifier, "carso_input_grad": carso_grad}


def stage_parts(cfg, work: dict, f: dict | None = None) -> dict[str, dict[str, float]]:
    """Each stage's FLOPs by the kind of work that does them (``pipeline.calibrate`` times one unit per kind):
    classifier ``train`` (PGD-k + the update, per example) and ``test`` (its PGD), ``attacks`` ``attack``,
    ``activations`` ``forward``, ``purifier`` ``train_step``, ``evaluate`` ``carso`` (the CARSO input gradients)
    and ``classifier_aa`` (standard AutoAttack on the classifier), ``probes`` ``probes``. ``work`` holds the counts
    of examples (from pipeline.plan); ``f`` the per-example FLOPs (``per_example``), computed when not given."""
    f = f or per_example(cfg)
    t, a = cfg.classifier.train, cfg.attack
    clf = {"test": work["n_test"] * t.eval_pgd_steps * f["classifier_input_grad"]}
    if cfg.classifier.source == "train":
        clf["train"] = t.epochs * work["n_train"] * (t.pgd_steps * f["classifier_input_grad"]
                                                     + f["classifier_train_step"])
    pur_step = f["purifier_train_step"] + (f["classifier_forward"] if cfg.purifier.activations_source == "recompute"
                                           else 0)
    aa = AA_STANDARD_GRAD_PASSES * f["classifier_input_grad"] + AA_STANDARD_FORWARDS * f["classifier_forward"]
    if work.get("attacked"):  # the runner attacks the points still right: APGD-CE the clean-right, the rest the robust
        c, r = work["attacked"].clean, work["attacked"].robust
        aa = ((AA_STANDARD_CE * c + (AA_STANDARD_GRAD_PASSES - AA_STANDARD_CE) * r) * f["classifier_input_grad"]
              + AA_STANDARD_FORWARDS * r * f["classifier_forward"])
    return {"classifier": clf,
            "attacks": {"attack": work["examples"] * (2 + 2 * a.pgd_steps) * f["classifier_input_grad"]},
            "activations": {"forward": work["samples"] * f["classifier_forward"]},
            "purifier": {"train_step": cfg.purifier.epochs * work["purifier_samples"] * pur_step},
            "evaluate": {"carso": work["n_eval"] * work["carso_passes"] * f["carso_input_grad"],
                         "classifier_aa": work["n_eval"] * aa},
            "probes": {"probes": probe_flops(cfg, work.get("probe_layers", 0), f)}}


def stage_flops(cfg, work: dict) -> dict[str, float]:
    """Total FLOPs per stage (the sums of ``stage_parts``) and ``per_example``."""
    f = per_example(cfg)
    return {**{stage: sum(parts.values()) for stage, parts in stage_parts(cfg, work, f).items()}, "per_example": f}


def probe_flops(cfg, layers: int, f: dict) -> float:
    """An upper bound of the probes stage: every probe attack step counted as a whole classifier gradient pass (the
    probes stop the forward at their layer) and the readouts' own matrix products left out."""
    pr = cfg.probes
    score = pr.n_examples * pr.pgd_steps * f["classifier_input_grad"]  # per attacked model
    per_layer = score * (int(pr.transfer) + int(pr.robust))
    if pr.robust:
        per_layer += pr.robust_epochs * pr.robust_examples * (pr.robust_pgd_steps + 1) * f["classifier_input_grad"]
    return score + layers * per_layer
