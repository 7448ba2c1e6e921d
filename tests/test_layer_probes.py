"""pipeline/probes.py on real (small) models: a SmallCNN with random weights on synthetic 28x28x1 two-class images.

The toy images (``toy``) carry two cues to the class, by construction:
- a *robust* cue, a 7x7 patch raised by 0.5 in the lower-right quadrant, present for class 1 and absent for class 0,
  flipped on 10% of the images (so it is right 90% of the time, and survives any L-inf attack below 0.25);
- a *non-robust* cue, a +-0.03 checkerboard in the upper-left quadrant whose sign is the class (right 100% of the
  time, erased by any L-inf attack above 0.03).
conv1 is affine in the pixels, so a probe on it is a linear classifier of the pixels: fitted on clean images it
leans on the checkerboard (the only cue that separates every image) and an adaptive attack at eps 0.1 breaks it;
adversarially trained at that eps it must use the patch and keeps about 90%.
"""
from __future__ import annotations

import pytest
import torch

from pipeline import probes as P
from pipeline.models.cnn import SmallCNN
from pipeline.models.hooks import forward_with_activations


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The test machine's cores are shared: one thread is faster than two contending ones."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def toy(n: int, seed: int, amp: float = 0.03, flip: float = 0.1):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    patch = (y == 1) ^ (torch.rand(n, generator=g) < flip)
    x = 0.3 + 0.05 * torch.randn(n, 1, 28, 28, generator=g)
    x[:, 0, 16:23, 16:23] += 0.5 * patch.float().view(n, 1, 1)
    ii, jj = torch.meshgrid(torch.arange(14), torch.arange(14), indexing="ij")
    board = ((ii + jj) % 2 * 2 - 1).float()
    x[:, 0, :14, :14] += amp * (2 * y - 1).float().view(n, 1, 1) * board
    return x.clamp(0, 1), y


def cnn(seed: int = 0, width: int = 2) -> SmallCNN:
    torch.manual_seed(seed)
    return SmallCNN(num_classes=2, width=width).eval()


def accuracy(probe, feats, y) -> float:
    with torch.no_grad():
        return (probe(feats).argmax(1) == y).float().mean().item()


def snapshot(model):
    return ({k: v.detach().cpu().numpy().tobytes() for k, v in model.state_dict().items()},
            [(name, m.training) for name, m in model.named_modules()],
            [(name, p.requires_grad) for name, p in model.named_parameters()])


FIT = dict(epochs=10, batch_size=64, lr=1e-3, weight_decay=0.0)


# --------------------------------------------------------------------------------------------------
# Transfer probes on stored features
# --------------------------------------------------------------------------------------------------
def gaussian_feats(n: int, seed: int):
    """Two classes in (N, 3, 4, 4) float16 features, separated along a random direction (+-2 sigma)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    direction = torch.randn(48, generator=torch.Generator().manual_seed(99))
    direction /= direction.norm()
    f = 3.0 + 2.0 * torch.randn(n, 48, generator=g) + 2 * 2.0 * (2 * y - 1).float()[:, None] * direction
    return f.view(n, 3, 4, 4).half(), y


def test_transfer_probe_learns_separable_features_and_not_shuffled_labels():
    ftr, ytr = gaussian_feats(1000, 1)
    fte, yte = gaussian_feats(500, 2)
    probe = P.fit_linear_probe(ftr, ytr, 2, seed=0, **FIT)
    assert probe.mean.dtype == torch.float32 and ftr.dtype == torch.float16  # the store's dtype, read per batch
    assert accuracy(probe, fte, yte) > 0.9  # Bayes: 97.7%
    shuffled = ytr[torch.randperm(len(ytr), generator=torch.Generator().manual_seed(5))]
    assert accuracy(P.fit_linear_probe(ftr, shuffled, 2, seed=0, **FIT), fte, yte) < 0.7


def test_standardisation_streams_exact_moments_and_floors_constant_features():
    f, y = gaussian_feats(300, 3)
    f = f.view(300, 48).clone()
    f[:, 7] = 2.0  # a constant feature (a zero-padded border, a dead unit)
    probe = P.fit_linear_probe(f, y, 2, epochs=1, batch_size=64, lr=1e-3, weight_decay=0.0, seed=0)
    ref = f.double()
    torch.testing.assert_close(probe.mean, ref.mean(0).float())
    std = ref.std(0, unbiased=False).float()
    floor = P.STD_FLOOR_REL * std.mean().item()
    assert probe.std[7].item() == pytest.approx(floor, rel=1e-5)
    others = torch.arange(48) != 7
    torch.testing.assert_close(probe.std[others], std[others])
    # The constant feature never trained, so its weight stays at the zero start: a test-time change in it (the
    # attacker's lever on a floored feature) moves nothing.
    assert torch.equal(probe.linear.weight[:, 7], torch.zeros(2))


def test_fit_linear_probe_is_deterministic_for_a_seed():
    f, y = gaussian_feats(400, 4)
    a, b = (P.fit_linear_probe(f, y, 2, seed=3, **FIT) for _ in range(2))
    c = P.fit_linear_probe(f, y, 2, seed=4, **FIT)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    assert not torch.equal(a.linear.weight, c.linear.weight)


# --------------------------------------------------------------------------------------------------
# ProbedClassifier: the frozen layers up to one, then the probe
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layer", ["conv2", "fc1"])  # a (N, C, H, W) and a (N, D) activation
def test_probed_classifier_equals_probe_of_hooked_activation_and_stops_early(layer):
    model = cnn(width=4)
    x, _ = toy(16, 7)
    _, (acts,) = forward_with_activations(model, x, [layer])
    dim = acts[0].numel()
    probe = P.LinearProbe(dim, 2, torch.zeros(dim), torch.ones(dim))
    with torch.no_grad():
        probe.linear.weight.normal_(generator=torch.Generator().manual_seed(0))
    probed = P.ProbedClassifier(model, layer, probe)
    calls = []
    above = model.logits.register_forward_hook(lambda *_: calls.append("logits"))
    above2 = model.act4.register_forward_hook(lambda *_: calls.append("act4"))
    try:
        xr = x.clone().requires_grad_(True)
        out = probed(xr)
        assert torch.allclose(out, probe(acts), atol=1e-5)
        assert calls == []  # the layers above never ran
        out.sum().backward()
        model(x)
        assert calls == ["act4", "logits"]  # the hooks do fire on a full forward
    finally:
        above.remove(), above2.remove()
    assert xr.grad is not None and xr.grad.abs().sum() > 0
    assert probe.linear.weight.grad is not None and probe.linear.weight.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())
    assert not model._forward_hooks and not getattr(model, layer)._forward_hooks  # no hook left behind
    assert probed.train().classifier.training is False and probe.training
    assert set(probed.state_dict()) == {f"classifier.{k}" for k in model.state_dict()} | \
        {f"probe.{k}" for k in probe.state_dict()}
    with pytest.raises(KeyError):
        P.ProbedClassifier(model, "no_such_layer", probe)


def test_layer_features_match_a_full_forward_in_any_batching():
    model = cnn(width=4)
    x, _ = toy(37, 8)
    _, (ref,) = forward_with_activations(model, x, ["conv3"])
    for bs in (5, 37, 100):
        f = P.layer_features(model, "conv3", x, bs)
        assert f.shape == ref.shape and not f.requires_grad
        torch.testing.assert_close(f, ref.detach())


# --------------------------------------------------------------------------------------------------
# Scores, the classifier left alone, determinism
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fitted():
    """A transfer probe on conv3 of a random width-4 SmallCNN, fitted on clean toy images, and test points. (At
    width 2, dead ReLUs leave some images with a zero input gradient: PGD cannot move them.)"""
    model = cnn(width=4)
    xtr, ytr = toy(512, 1)
    probe = P.fit_linear_probe(P.layer_features(model, "conv3", xtr, 128), ytr, 2, seed=0, **FIT)
    x, y = toy(200, 2)
    return model, probe, x, y


def test_adaptive_attack_strength_brackets(fitted):
    model, probe, x, y = fitted
    args = dict(seed=1, batch_size=64)
    shuffled = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))]  # other images, same labels
    strong = P.score_probe(model, "conv3", probe, x, y, shuffled, eps=0.5, steps=20, step_size=0.05, **args)
    assert strong["n"] == 200 and strong["clean"] > 0.9
    with torch.no_grad():  # transfer: the plain accuracy on the given inputs, whatever they are
        plain = (P.ProbedClassifier(model, "conv3", probe).eval()(shuffled).argmax(1) == y).float().mean().item()
    assert strong["transfer"] == pytest.approx(plain) and strong["transfer"] < 0.5
    assert strong["adaptive"] <= strong["clean"] and strong["adaptive"] < 0.2
    tiny = P.score_probe(model, "conv3", probe, x, y, x, eps=1e-4, steps=5, step_size=1e-4, **args)
    assert tiny["clean"] == strong["clean"] and abs(tiny["adaptive"] - tiny["clean"]) <= 0.01


def test_classifier_scores_and_transfer_inputs(fitted):
    model, probe, x, y = fitted
    eps = 0.1
    s, x_adv = P.classifier_scores(model, x, y, eps=eps, steps=5, step_size=0.03, seed=0, batch_size=64)
    assert s["n"] == 200 and 0.0 <= s["pgd"] <= s["clean"] <= 1.0
    assert x_adv.shape == x.shape and not x_adv.requires_grad
    assert (x_adv - x).abs().max() <= eps + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    assert (x_adv != x).any()
    s2, x_adv2 = P.classifier_scores(model, x, y, eps=eps, steps=5, step_size=0.03, seed=0, batch_size=64)
    assert s2 == s and torch.equal(x_adv, x_adv2)
    r = P.score_probe(model, "conv3", probe, x, y, x_adv, eps=eps, steps=5, step_size=0.03, seed=1, batch_size=64)
    with torch.no_grad():
        plain = (P.ProbedClassifier(model, "conv3", probe)(x_adv).argmax(1) == y).float().mean().item()
    assert r["transfer"] == pytest.approx(plain)


def test_classifier_weights_and_mode_unchanged():
    model = cnn(width=2).train()  # a caller's model in train mode, with trainable parameters, stays so
    model.conv1.eval()  # and a mixed-mode model keeps its mix
    before = snapshot(model)
    x, y = toy(64, 3)
    probe = P.fit_robust_probe(model, "conv2", x, y, 2, eps=0.1, steps=2, step_size=0.05, epochs=1, batch_size=32,
                               lr=1e-3, weight_decay=1e-4, seed=0)
    assert snapshot(model) == before
    _, x_adv = P.classifier_scores(model, x, y, eps=0.1, steps=2, step_size=0.05, seed=0, batch_size=32)
    assert snapshot(model) == before
    P.score_probe(model, "conv2", probe, x, y, x_adv, eps=0.1, steps=2, step_size=0.05, seed=1, batch_size=32)
    P.layer_features(model, "conv2", x, 32)
    assert snapshot(model) == before
    assert all(p.grad is None for p in model.parameters())


def test_fit_robust_probe_is_deterministic_for_a_seed():
    model = cnn(width=2)
    x, y = toy(96, 4)
    kw = dict(eps=0.1, steps=2, step_size=0.05, epochs=2, batch_size=32, lr=1e-2, weight_decay=0.0)
    a, b = (P.fit_robust_probe(model, "conv1", x, y, 2, seed=5, **kw) for _ in range(2))
    c = P.fit_robust_probe(model, "conv1", x, y, 2, seed=6, **kw)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    assert not torch.equal(a.linear.weight, c.linear.weight)
    # the standardisation comes from the clean training features, whatever the seed
    assert torch.equal(a.mean, c.mean) and torch.equal(a.std, c.std)
    torch.testing.assert_close(a.mean, P.layer_features(model, "conv1", x, 96).flatten(1).mean(0))


def test_robust_probe_beats_clean_probe_under_adaptive_attack():
    """By construction (module docstring): the clean probe leans on the checkerboard, which eps 0.1 erases; the
    robust probe must use the patch."""
    model = cnn(width=2)
    xtr, ytr = toy(512, 1)
    x, y = toy(200, 2)
    eps, score = 0.1, dict(steps=10, step_size=0.02, batch_size=100)
    _, x_tr = P.classifier_scores(model, x, y, eps=eps, seed=0, **score)
    clean_probe = P.fit_linear_probe(P.layer_features(model, "conv1", xtr, 128), ytr, 2, seed=0, **FIT)
    logs = []
    robust_probe = P.fit_robust_probe(model, "conv1", xtr, ytr, 2, eps=eps, steps=5, step_size=0.04, epochs=3,
                                      batch_size=64, lr=1e-3, weight_decay=0.0, seed=0, log=logs.append)
    assert len(logs) == 3 and all(line.startswith("[probes] robust probe (conv1) epoch") for line in logs)
    t = P.score_probe(model, "conv1", clean_probe, x, y, x_tr, eps=eps, seed=1, **score)
    r = P.score_probe(model, "conv1", robust_probe, x, y, x_tr, eps=eps, seed=1, **score)
    assert t["clean"] > 0.95  # the checkerboard separates every image
    assert t["adaptive"] < 0.2
    assert 0.8 < r["clean"] < 0.97 and r["adaptive"] > 0.8  # the patch: right ~90% of the time, robust
    assert r["adaptive"] >= t["adaptive"] + 0.5
