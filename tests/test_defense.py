"""CARSO's inference module and its aggregations (plain PyTorch)."""
import pytest
import torch
import torch.nn.functional as F

from pipeline.data import info
from pipeline.defense import Carso, aggregate
from pipeline.models import build_classifier
from pipeline.models.purifier import Purifier
from pipeline.sizing import layer_shapes


def _reference_robust(logits: torch.Tensor) -> torch.Tensor:
    """float64: log P_i = log( prod_a exp(exp(l_i^a)) / Z ) = S_i - logsumexp_j S_j, S_i = sum_a exp(l_i^a)."""
    s = torch.exp(logits.double()).sum(0)
    return s - torch.logsumexp(s, dim=1, keepdim=True)


@pytest.mark.parametrize("scale", [1.0, 3.0, 6.0, 12.0])
def test_robust_aggregation_matches_float64_reference(scale):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 16, 10, generator=g) * scale
    ours = aggregate(logits, "robust")
    ref = _reference_robust(logits)
    assert torch.isfinite(ours).all()
    assert torch.equal(ours.argmax(1), ref.argmax(1))
    # Compare where float32 can represent the value at all (log P of a clear loser is about -exp(12 scale)).
    close = ref > -1e6
    assert torch.allclose(ours.double()[close], ref[close], rtol=1e-4, atol=1e-4)


def test_naive_formula_overflows_where_ours_does_not():
    logits = torch.tensor([[[5.0, 2.0, 0.0]]]).repeat(8, 1, 1)  # exp(exp(5)) = e^148: inf in float32
    naive = torch.exp(torch.exp(logits)).prod(0)
    assert torch.isinf(naive).any()
    lp = aggregate(logits.requires_grad_(), "robust")
    assert torch.isfinite(lp).all()
    lp[0, 1].backward()
    assert torch.isfinite(logits.grad).all()
    # softmax(sum exp l) saturates to exactly 1.0 at a small margin; log space keeps the loser's mass.
    margin = torch.tensor([[[1.5, 0.0]]]).repeat(8, 1, 1)
    naive_p = F.softmax(torch.exp(margin).sum(0), 1)
    assert naive_p[0, 0] == 1.0  # saturated: log(1 - p) = -inf, and its gradient NaN
    ours = aggregate(margin, "robust")
    assert torch.allclose(ours.double(), _reference_robust(margin), rtol=1e-5) and ours[0, 1] > -28.0


def test_logit_and_prob_modes_match_their_formulas():
    logits = torch.randn(5, 4, 7, dtype=torch.float64)
    lp = aggregate(logits, "logit")
    assert torch.allclose(lp.exp(), F.softmax(logits.mean(0), 1))
    pp = aggregate(logits, "prob")
    assert torch.allclose(pp.exp(), F.softmax(logits, 2).mean(0))
    assert torch.allclose(pp.exp().sum(1), torch.ones(4, dtype=torch.float64))
    with pytest.raises(ValueError):
        aggregate(logits, "median")


def _tiny_carso(samples=4, aggregation="robust"):
    torch.manual_seed(0)
    clf = build_classifier("cnn", "fmnist").eval()
    shapes = layer_shapes("cnn", "fmnist", "relu", None)
    meta = info("fmnist")
    pur = Purifier(image_shape=(1, 28, 28), layer_shapes=shapes, fc_repr=32, f_joint=16, encoder_convs=3,
                   mean=meta.mean, std=meta.std)
    return Carso(clf, pur, list(shapes), samples=samples, aggregation=aggregation)


def test_gradients_reach_the_input_through_every_part():
    model = _tiny_carso()
    x = torch.rand(3, 1, 28, 28, requires_grad=True)
    out = model(x)
    assert out.shape == (3, 10) and torch.allclose(out.exp().sum(1), torch.ones(3), atol=1e-5)
    F.nll_loss(out, torch.tensor([0, 1, 2])).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    # The only path from x to the output is the classifier's hooked activations -> purifier -> classifier.
    for p in model.parameters():
        assert not p.requires_grad


def test_fresh_randomness_every_call_and_eval_mode_kept():
    model = _tiny_carso()
    model.train()  # an attack library may call this: BatchNorm must stay in eval mode
    assert not model.training and not model.purifier.training and not model.classifier.training
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        a, b = model.reconstructions(x), model.reconstructions(x)
    assert a.shape == (4, 2, 1, 28, 28) and not torch.equal(a, b)
    with torch.no_grad():
        assert not torch.equal(model(x), model(x))


def test_fast_kernels_compute_the_reference_carso_and_leave_the_baseline_alone():
    """eval.kernels=fast (channels-last, the purifier's BatchNorms folded) is the reference function rounded
    differently; the classifier-alone baseline keeps the stored network as it is."""
    import torch.nn as nn

    from pipeline.defense import CarsoWeights
    from pipeline.models import StoredClassifier
    from pipeline.models.purifier import PurifierSpec

    torch.manual_seed(0)
    clf = build_classifier("cnn", "fmnist").eval()
    shapes = layer_shapes("cnn", "fmnist", "relu", ["conv2", "conv3"])
    meta = info("fmnist")
    spec = PurifierSpec(image_shape=(1, 28, 28), layer_shapes=tuple((k, tuple(v)) for k, v in shapes.items()),
                        fc_repr=32, f_joint=16, encoder_convs=3, mean=tuple(meta.mean), std=tuple(meta.std))
    trained = spec.build()
    for m in trained.modules():  # BatchNorm statistics away from (0, 1), as training leaves them
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    weights = CarsoWeights(StoredClassifier(arch="cnn", activation="relu", dataset="fmnist",
                                            state_dict=clf.state_dict(), weights_sha256="0" * 64),
                           spec, trained.state_dict())
    x, y = torch.rand(5, 1, 28, 28), torch.tensor([0, 1, 2, 3, 4])
    grads, outs = {}, {}
    for kernels in ("reference", "fast"):
        base, carso = weights.build("cpu", samples=3, aggregation="robust", kernels=kernels)
        xi = x.clone().requires_grad_()
        torch.manual_seed(7)  # the same latent draws
        outs[kernels] = carso(xi)
        F.nll_loss(outs[kernels], y).backward()
        grads[kernels] = xi.grad
        batchnorms = [m for m in carso.purifier.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))]
        assert bool(batchnorms) == (kernels == "reference")
        for net in (carso.classifier, carso.purifier):  # a convolution with more than one input channel
            conv = next(p for p in net.parameters() if p.dim() == 4 and p.shape[1] > 1 and p.shape[2] > 1)
            assert conv.is_contiguous() == (kernels == "reference")
        assert all(p.is_contiguous() for p in base.parameters())  # the baseline: the stored network as it is
    assert torch.allclose(outs["fast"], outs["reference"], rtol=1e-4, atol=1e-5)
    assert torch.allclose(grads["fast"], grads["reference"], rtol=1e-3, atol=1e-7)
    assert grads["reference"].abs().sum() > 0
    with pytest.raises(ValueError, match="unknown kernels"):
        Carso(clf, spec.build(), ["conv2", "conv3"], kernels="nhwc")
