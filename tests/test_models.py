"""The WRN must be RobustBench's DMWideResNet, name for name and logit for logit.

The reference is RobustBench's own ``robustbench/model_zoo/architectures/dm_wide_resnet.py`` (installed by the
dev set-up with ``pip install --no-deps robustbench``), loaded by path: the package's ``__init__`` imports
torchvision, which does not import beside the CPU build of torch. It is built the way RobustBench builds
``Cui2023Decoupled_WRN-28-10`` (depth 28, width 10, swish, CIFAR-10 mean/std), the paper's scenario (a) model.
"""
import importlib.util
from importlib import metadata

import pytest
import torch
import torch.nn as nn

from pipeline.models import ModelError, build_classifier, load_state_dict_file, load_weights, state_dict_hash
from pipeline.models.hooks import forward_with_activations
from pipeline.models.wrn import WideResNet


def _robustbench_dm():
    try:
        path = metadata.distribution("robustbench").locate_file("robustbench/model_zoo/architectures/dm_wide_resnet.py")
    except metadata.PackageNotFoundError:
        pytest.fail("robustbench is not installed: run `bash .ci/setup` (pip install --no-deps robustbench==1.1.1)")
    spec = importlib.util.spec_from_file_location("rb_dm_wide_resnet", str(path))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _robustbench_wrn():
    dm = _robustbench_dm()
    return dm.DMWideResNet(num_classes=10, depth=28, width=10, activation_fn=dm.Swish, mean=dm.CIFAR10_MEAN,
                           std=dm.CIFAR10_STD)


def _randomise_bn(model, gen):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen) * 0.1)


def test_dm_state_dict_loads_strictly_and_matches_logits(tmp_path):
    torch.manual_seed(0)
    ref = _robustbench_wrn()
    _randomise_bn(ref, torch.Generator().manual_seed(1))
    ref.eval()
    path = tmp_path / "dm.pt"
    torch.save(ref.state_dict(), path)
    ours = build_classifier("wrn-28-10", "cifar10", "swish")
    assert set(ours.state_dict()) == set(ref.state_dict()) and "mean" not in ref.state_dict()
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
    # Table 5's names hook on the loaded model.
    _, acts = forward_with_activations(ours, x[:1], ours.default_layers())
    assert len(acts) == 26


@pytest.mark.parametrize("depth,width", [(16, 2), (10, 1)])
def test_any_wrn_size_matches_robustbench_on_fashion_mnist(tmp_path, depth, width):
    """``wrn-D-W`` on 28x28x1 inputs: RobustBench's DMWideResNet of that depth and width, logit for logit; its
    default conditioning list is Table 5's pattern (both convolutions of every block, the two shortcuts)."""
    dm = _robustbench_dm()
    torch.manual_seed(0)
    ref = dm.DMWideResNet(num_classes=10, depth=depth, width=width, activation_fn=dm.Swish, mean=(0.2860,),
                          std=(0.3530,), num_input_channels=1)
    _randomise_bn(ref, torch.Generator().manual_seed(2))
    ref.eval()
    ours = build_classifier(f"wrn-{depth}-{width}", "fmnist", "swish")
    load_weights(ours, ref.state_dict(), "ref").eval()
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        # RobustBench pools with avg_pool2d(8), made for 32x32 inputs; on 28x28 the last map is 7x7, which our
        # adaptive pooling averages whole: compare the features before the pooling, and the logits by hand.
        feats = ref.relu(ref.batchnorm(ref.layer(ref.init_conv((x - ref.mean) / ref.std))))
        assert feats.shape[-2:] == (7, 7)
        assert torch.allclose(ours(x), ref.logits(feats.mean((2, 3))), atol=1e-4, rtol=1e-4)
    n = (depth - 4) // 6
    layers = ours.default_layers()
    assert len(layers) == 6 * n + 2 and layers[:2] == ["layer.0.block.0.conv_0", "layer.0.block.0.conv_1"]
    assert [name for name in layers if "shortcut" in name] == ["layer.1.block.0.shortcut", "layer.2.block.0.shortcut"]
    assert f"layer.2.block.{n - 1}.conv_1" in layers and len(set(layers)) == len(layers)
    _, acts = forward_with_activations(ours, x[:1], layers)
    assert [tuple(a.shape[-2:]) for a in acts][::len(acts) - 1] == [(28, 28), (7, 7)]


@pytest.mark.parametrize("arch,needle", [("wrn-15-2", r"depth 15 is not 6n\+4"), ("wrn-28-0", "width must be >= 1"),
                                         ("resnet-18", "valid choices are 'cnn' or 'wrn-D-W'")])
def test_invalid_architecture_names_are_refused_naming_the_key(arch, needle):
    from pipeline.config import ConfigError, load_config
    from tests.conftest import REPO

    with pytest.raises(ConfigError, match=needle) as e:
        load_config(REPO / "configs/fmnist.yaml", [f"classifier.arch={arch}"])
    assert "classifier.arch: " in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ModelError, match=needle):
        build_classifier(arch, "fmnist")


def test_legacy_checkpoint_with_normalisation_buffers_still_loads(tmp_path):
    """WRN files written before the normalisation left the state_dict (this store's own model.pt) still load."""
    ours = build_classifier("wrn-28-10", "cifar10", "swish")
    legacy = {**ours.state_dict(), "mean": ours.mean.clone(), "std": ours.std.clone()}
    other = build_classifier("wrn-28-10", "cifar10", "swish")
    load_weights(other, legacy, "legacy.pt")
    assert state_dict_hash(other) == state_dict_hash(ours)
    with pytest.raises(ModelError, match="legacy2.pt: weights do not match"):  # anything else stays strict
        load_weights(other, {**legacy, "extra": torch.zeros(1)}, "legacy2.pt")


def test_checkpoint_wrapped_and_dataparallel_prefix(tmp_path):
    torch.manual_seed(0)
    m = build_classifier("cnn", "fmnist")
    p = tmp_path / "ck.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in m.state_dict().items()}}, p)
    torch.manual_seed(1)  # another initialisation: every weight must come from the file
    fresh = build_classifier("cnn", "fmnist")
    assert not all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), m.state_dict().values()))
    load_weights(fresh, load_state_dict_file(p), str(p))
    saved, loaded = m.state_dict(), fresh.state_dict()
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)


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


@pytest.mark.parametrize("dataset,side,sides", [("cifar10", 32, [32, 16, 8]), ("tinyimagenet", 64, [64, 32, 16])])
def test_cnn_builds_for_every_square_input_size(dataset, side, sides):
    m = build_classifier("cnn", dataset).eval()
    with torch.no_grad():
        logits, acts = forward_with_activations(m, torch.rand(2, m.mean.shape[0], side, side), m.default_layers())
    assert logits.shape[1] == m.logits.out_features and [a.shape[-1] for a in acts] == sides
    from pipeline.models.cnn import SmallCNN

    with pytest.raises(ValueError, match="at least 25x25"):
        SmallCNN(size=24)
