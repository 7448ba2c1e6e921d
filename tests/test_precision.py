"""Opt-in bfloat16 autocast agrees with float32 within stated tolerances (CPU), and never changes a float32 key."""
import torch

from pipeline.config import load_config
from pipeline.defense import Carso
from pipeline.models import build_classifier
from pipeline.models.hooks import forward_with_activations
from pipeline.models.purifier import Purifier
from pipeline.precision import autocast, wrap
from pipeline.purifier_train import build_optimizer, train_step
from tests.conftest import REPO

# Stated tolerances (bfloat16 keeps 8 bits of mantissa: ~0.4% per rounding, a few roundings deep):
LOGIT_TOL = 0.05        # max |logit difference| relative to the largest |logit|
ACT_TOL = 0.05          # same, per hooked layer
LOSS_TOL = 0.02         # relative difference of the purifier's training loss
GRAD_SIGN_AGREE = 0.9   # share of input-gradient signs (what FGSM/PGD steps use) that agree


def _setup():
    torch.manual_seed(0)
    clf = build_classifier("cnn", "fmnist").eval()
    x = torch.rand(16, 1, 28, 28)
    return clf, x


def _rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def test_classifier_logits_activations_and_attack_gradients_agree():
    clf, x = _setup()
    assert _rel(wrap(clf, "bfloat16", "cpu")(x), clf(x)) < LOGIT_TOL
    _, a32 = forward_with_activations(clf, x, ["conv1", "conv2", "conv3"])
    with autocast("bfloat16", "cpu"):
        _, a16 = forward_with_activations(clf, x, ["conv1", "conv2", "conv3"])
    assert all(t.dtype == torch.bfloat16 for t in a16)
    assert all(_rel(b, a) < ACT_TOL for a, b in zip(a32, a16))
    y = clf(x).argmax(1)
    grads = []
    for model in (clf, wrap(clf, "bfloat16", "cpu")):
        xr = x.clone().requires_grad_(True)
        torch.nn.functional.cross_entropy(model(xr), y).backward()
        grads.append(xr.grad.sign())
    assert (grads[0] == grads[1]).float().mean().item() > GRAD_SIGN_AGREE


def test_purifier_training_step_and_carso_agree():
    clf, x = _setup()
    layers = ["conv3"]
    p = load_config(REPO / "configs/fmnist.yaml").purifier
    _, acts = forward_with_activations(clf, x, layers)
    losses = []
    for precision in ("float32", "bfloat16"):
        torch.manual_seed(1)
        pur = Purifier(image_shape=(1, 28, 28), layer_shapes={"conv3": (64, 7, 7)}, fc_repr=64, f_joint=16,
                       encoder_convs=3, mean=(0.286,), std=(0.353,))
        opt = build_optimizer(pur, p)
        st = train_step(pur, opt, x, x, [a.detach() for a in acts], beta=1.0, precision=precision)
        losses.append(st.loss)
    assert abs(losses[1] - losses[0]) / abs(losses[0]) < LOSS_TOL
    pur.eval()
    outs = []
    for precision in ("float32", "bfloat16"):
        torch.manual_seed(2)
        out = Carso(clf, pur, layers, samples=4, aggregation="logit", precision=precision)(x)
        assert out.dtype == torch.float32
        outs.append(out)
    assert _rel(outs[1], outs[0]) < LOGIT_TOL
