"""The purifier's training step, Lookahead's slow weights and the posterior-collapse diagnostics (plain PyTorch)."""
import torch

from pipeline.config import PurifierConfig
from pipeline.models.purifier import Purifier, kl_per_dim, vae_loss
from pipeline.purifier_train import active_units, build_optimizer, slow_state_dict, train_step

SHAPES = {"a": (4, 14, 14), "b": (8, 7, 7)}


def _model():
    torch.manual_seed(0)
    return Purifier(image_shape=(1, 28, 28), layer_shapes=SHAPES, fc_repr=16, f_joint=8, encoder_convs=3,
                    mean=(0.3,), std=(0.4,))


def _batch(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    targets = torch.rand(n, 1, 28, 28, generator=g)
    inputs = (targets + 0.1 * torch.randn(n, 1, 28, 28, generator=g)).clamp(0, 1)  # "perturbed"
    acts = [torch.randn(n, *s, generator=g) for s in SHAPES.values()]
    return inputs, targets, acts


def test_encoder_reads_the_input_and_the_loss_targets_the_clean_image():
    model = _model()
    opt = build_optimizer(model, PurifierConfig(plateau_lr=1e-3))
    inputs, targets, acts = _batch()
    seen = []
    model.input_encoder.register_forward_hook(lambda m, args, out: seen.append(args[0].detach().clone()))
    torch.manual_seed(5)
    st = train_step(model, opt, inputs, targets, acts, beta=0.5)
    assert torch.allclose(seen[0], (inputs - 0.3) / 0.4)            # the (perturbed) input, standardised
    assert not torch.allclose(seen[0], (targets - 0.3) / 0.4)
    # The reported reconstruction term is the BCE against the clean target, for the same draw of z.
    model2 = _model()
    torch.manual_seed(5)
    x_hat, mu, logvar = model2(inputs, acts)
    _, reco, kl = vae_loss(x_hat, targets, mu, logvar, 0.5)
    assert abs(st.reconstruction - reco.item()) < 1e-3 and abs(st.kl - kl.item()) < 1e-5 and st.n == 6


def test_final_weights_are_lookaheads_slow_weights():
    model = _model()
    p = PurifierConfig(plateau_lr=1e-2, lookahead_k=3)
    opt = build_optimizer(model, p)
    for g in opt.param_groups:
        g["lr"] = 1e-2
    inputs, targets, acts = _batch()
    for _ in range(3):  # exactly k steps: the sync just happened, slow == fast
        train_step(model, opt, inputs, targets, acts, beta=1.0)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in slow_state_dict(model, opt).items())
    for _ in range(2):  # two fast steps past the sync
        train_step(model, opt, inputs, targets, acts, beta=1.0)
    slow, fast = slow_state_dict(model, opt), model.state_dict()
    params = dict(model.named_parameters())
    assert any(not torch.equal(slow[k], fast[k]) for k in params)
    assert all(torch.equal(slow[k], opt.state[params[k]]["slow_params"]) for k in params)
    buffers = [k for k in fast if k not in params]  # BatchNorm statistics are kept as they are
    assert buffers and all(torch.equal(slow[k], fast[k]) for k in buffers)
    fresh = _model()
    fresh.load_state_dict(slow)  # a complete state_dict for the same architecture


def test_kl_per_dimension_and_active_units():
    mu = torch.tensor([[0.0, 1.0, 0.1], [0.0, -1.0, 0.0]])
    logvar = torch.zeros(2, 3)
    dims = kl_per_dim(mu, logvar).mean(0)
    assert torch.allclose(dims, torch.tensor([0.0, 0.5, 0.0025]))
    _, _, kl, per = vae_loss(torch.full((2, 1, 1, 1), 0.5), torch.ones(2, 1, 1, 1), mu, logvar, 1.0, per_dim=True)
    assert torch.allclose(per, dims) and abs(kl.item() - dims.sum().item()) < 1e-6
    assert active_units(dims) == 1 and active_units([0.02, 0.011, 0.0]) == 2
