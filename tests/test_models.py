"""The WRN must be RobustBench's DMWideResNet, name for name and logit for logit.

``_ReferenceDM`` below is an independent re-statement of DeepMind's / RobustBench's WideResNet (custom
autograd swish, manual 'SAME' padding, avg_pool2d(8), the same attribute names), written for this test:
the way RobustBench builds ``Cui2023Decoupled_WRN-28-10`` (depth 28, width 10, swish, CIFAR-10 mean/std).
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.models import ModelError, build_classifier, load_state_dict_file, load_weights, state_dict_hash
from pipeline.models.hooks import forward_with_activations
from pipeline.models.wrn import WideResNet


class _SwishFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, i):
        ctx.save_for_backward(i)
        return i * torch.sigmoid(i)

    @staticmethod
    def backward(ctx, g):
        (i,) = ctx.saved_tensors
        s = torch.sigmoid(i)
        return g * (s * (1 + i * (1 - s)))


class _Swish(nn.Module):
    def forward(self, x):
        return _SwishFn.apply(x)


class _RefBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.batchnorm_0, self.relu_0 = nn.BatchNorm2d(cin), _Swish()
        self.conv_0 = nn.Conv2d(cin, cout, 3, stride, 0, bias=False)
        self.batchnorm_1, self.relu_1 = nn.BatchNorm2d(cout), _Swish()
        self.conv_1 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.has_shortcut = cin != cout
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, 0, bias=False) if self.has_shortcut else None
        self.stride = stride

    def forward(self, x):
        if self.has_shortcut:
            x = self.relu_0(self.batchnorm_0(x))
            v = x
        else:
            v = self.relu_0(self.batchnorm_0(x))
        v = F.pad(v, (1, 1, 1, 1) if self.stride == 1 else (0, 1, 0, 1))
        out = self.conv_1(self.relu_1(self.batchnorm_1(self.conv_0(v))))
        return torch.add(self.shortcut(x) if self.has_shortcut else x, out)


class _RefGroup(nn.Module):
    def __init__(self, n, cin, cout, stride):
        super().__init__()
        self.block = nn.Sequential(*[_RefBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1) for i in range(n)])

    def forward(self, x):
        return self.block(x)


class _ReferenceDM(nn.Module):
    def __init__(self, num_classes=10, mean=(0.4914, 0.4822, 0.4465), std=(0.2471, 0.2435, 0.2616)):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(3, 1, 1))
        self.init_conv = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.layer = nn.Sequential(_RefGroup(4, 16, 160, 1), _RefGroup(4, 160, 320, 2), _RefGroup(4, 320, 640, 2))
        self.batchnorm, self.relu = nn.BatchNorm2d(640), _Swish()
        self.logits = nn.Linear(640, num_classes)

    def forward(self, x):
        out = self.layer(self.init_conv((x - self.mean) / self.std))
        out = F.avg_pool2d(self.relu(self.batchnorm(out)), 8)
        return self.logits(out.view(-1, 640))


def _randomise_bn(model, gen):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen) * 0.1)


def test_dm_state_dict_loads_strictly_and_matches_logits(tmp_path):
    torch.manual_seed(0)
    ref = _ReferenceDM()
    _randomise_bn(ref, torch.Generator().manual_seed(1))
    ref.eval()
    path = tmp_path / "dm.pt"
    torch.save(ref.state_dict(), path)
    ours = build_classifier("wrn-28-10", "cifar10", "swish")
    assert set(ours.state_dict()) == set(ref.state_dict())
    load_weights(ours, load_state_dict_file(path), str(path)).eval()  # strict=True inside
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(ours(x), ref(x), atol=1e-4, rtol=1e-4)
    # Gradients agree too (custom-autograd swish vs nn.SiLU).
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours(xa).sum().backward()
    ref(xb).sum().backward()
    assert torch.allclose(xa.grad, xb.grad, atol=1e-4, rtol=1e-3)
    assert state_dict_hash(ours) == state_dict_hash(ref)


def test_checkpoint_wrapped_and_dataparallel_prefix(tmp_path):
    m = build_classifier("cnn", "fmnist")
    p = tmp_path / "ck.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in m.state_dict().items()}}, p)
    load_weights(build_classifier("cnn", "fmnist"), load_state_dict_file(p), str(p))


def test_mismatched_checkpoint_is_one_clear_error(tmp_path):
    p = tmp_path / "cnn.pt"
    torch.save(build_classifier("cnn", "fmnist").state_dict(), p)
    with pytest.raises(ModelError, match="cnn.pt: weights do not match"):
        load_weights(build_classifier("wrn-28-10", "cifar10"), load_state_dict_file(p), str(p))


def test_checkpoint_with_code_is_refused(tmp_path):
    p = tmp_path / "evil.pt"
    torch.save({"model": build_classifier("cnn", "fmnist")}, p)  # a pickled module, not a state_dict
    with pytest.raises(ModelError, match="weights_only"):
        load_state_dict_file(p)


def test_wrn_table5_layers_hook_shapes():
    m = build_classifier("wrn-28-10", "cifar10").eval()
    layers = m.default_layers()
    assert len(layers) == 26 and layers[10] == "layer.1.block.0.shortcut" and layers[19] == "layer.2.block.0.shortcut"
    with torch.no_grad():
        _, acts = forward_with_activations(m, torch.rand(1, 3, 32, 32), layers)
    shapes = {n: tuple(a.shape[1:]) for n, a in zip(layers, acts)}
    assert shapes["layer.0.block.0.conv_0"] == (160, 32, 32)
    assert shapes["layer.1.block.0.conv_0"] == (320, 16, 16) and shapes["layer.1.block.0.shortcut"] == (320, 16, 16)
    assert shapes["layer.2.block.3.conv_1"] == (640, 8, 8)
    assert set(layers) <= set(m.hookable_layers())


def test_wrn_tinyimagenet_64px():
    m = WideResNet(num_classes=200, depth=28, width=10, activation="swish").eval()
    with torch.no_grad():
        assert m(torch.rand(2, 3, 64, 64)).shape == (2, 200)


def test_cnn_layers():
    m = build_classifier("cnn", "fmnist").eval()
    with torch.no_grad():
        logits, acts = forward_with_activations(m, torch.rand(2, 1, 28, 28), m.default_layers())
    assert logits.shape == (2, 10) and [a.shape[-1] for a in acts] == [28, 14, 7]
    with pytest.raises(KeyError, match="unknown layer"):
        forward_with_activations(m, torch.rand(1, 1, 28, 28), ["conv9"])
