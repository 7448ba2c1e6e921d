"""The purifier's architecture, loss, schedules and batch composition (plain PyTorch, no Ray)."""
import math

import numpy as np
import pytest
import torch

from pipeline.balanced import BalancedBatches, ShardData, global_kinds, steps_per_epoch, worker_kinds
from pipeline.config import load_config
from pipeline.data import info
from pipeline.models.purifier import Purifier, decoder_plan, vae_loss
from pipeline.schedules import beta_at, lr_at
from pipeline.sizing import layer_shapes
from tests.conftest import REPO


def _purifier(dataset, arch, convs, fc_repr, f_joint, device="meta"):
    meta = info(dataset)
    shapes = layer_shapes(arch, dataset, "swish", None)
    with torch.device(device):
        model = Purifier(image_shape=(meta.channels, meta.size, meta.size), layer_shapes=shapes, fc_repr=fc_repr,
                         f_joint=f_joint, encoder_convs=convs, mean=meta.mean, std=meta.std)
    return model, shapes


@pytest.mark.parametrize("dataset,convs,fc_repr,f_joint,params,repr_features", [
    ("cifar10", 3, 512, 128, 106_381_537, 147_040),       # scenario (a) (and (b): same purifier)
    ("tinyimagenet", 4, 768, 192, 324_508_537, 377_600),  # scenario (c)
])
def test_paper_purifiers_parameter_counts_and_shapes(dataset, convs, fc_repr, f_joint, params, repr_features):
    model, shapes = _purifier(dataset, "wrn-28-10", convs, fc_repr, f_joint)
    assert sum(p.numel() for p in model.parameters()) == params
    assert model.repr_features == repr_features and len(shapes) == 26
    size = info(dataset).size
    acts = [torch.empty(2, *s, device="meta") for s in shapes.values()]
    x_hat, mu, logvar = model(torch.empty(2, 3, size, size, device="meta"), acts)
    assert x_hat.shape == (2, 3, size, size) and mu.shape == logvar.shape == (2, f_joint)
    assert model.sample(acts, 8).shape == (16, 3, size, size)


def test_fmnist_purifier_real_forward():
    model, shapes = _purifier("fmnist", "cnn", 3, 256, 64, device="cpu")
    acts = [torch.randn(4, *s) for s in shapes.values()]
    x_hat, mu, _ = model(torch.rand(4, 1, 28, 28), acts)
    assert x_hat.shape == (4, 1, 28, 28) and 0 <= x_hat.min() and x_hat.max() <= 1
    model.eval()
    a, b = model.sample(acts, 2), model.sample(acts, 2)
    assert a.shape == (8, 1, 28, 28) and not torch.equal(a, b)  # fresh z each call


def test_decoder_plans():
    assert decoder_plan(32) == {"start": 3, "output_padding": [0, 0, 0, 0], "final_kernel": 2}  # Table 10
    assert decoder_plan(64) == {"start": 4, "output_padding": [1, 1, 1, 1], "final_kernel": 3}  # Table 11
    assert decoder_plan(28) == {"start": 2, "output_padding": [1, 0, 1, 1], "final_kernel": 3}


def test_loss_against_hand_computed_value():
    x_hat = torch.tensor([[[[0.25, 0.75]]], [[[0.5, 0.5]]]])
    target = torch.tensor([[[[0.0, 1.0]]], [[[1.0, 1.0]]]])
    mu = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    logvar = torch.tensor([[0.0, 0.0], [math.log(4.0), 0.0]])
    loss, reco, kl = vae_loss(x_hat, target, mu, logvar, beta=0.5)
    hand_reco = (-math.log(0.75) - math.log(0.75) + 2 * -math.log(0.5)) / 2
    # KL(N(mu, s^2) || N(0, 1)) = (s^2 + mu^2 - 1 - log s^2) / 2, summed over dims, averaged over the batch
    hand_kl = ((1 + 1 - 1 - 0) / 2 + 0 + (4 + 0 - 1 - math.log(4)) / 2 + (1 + 4 - 1 - 0) / 2) / 2
    assert reco.item() == pytest.approx(hand_reco, rel=1e-6)
    assert kl.item() == pytest.approx(hand_kl, rel=1e-6)
    assert loss.item() == pytest.approx(hand_reco + 0.5 * hand_kl, rel=1e-6)


def test_schedules_scenario_a():
    p = load_config(REPO / "configs/cifar10.yaml").purifier
    assert lr_at(0, p) == pytest.approx(5e-9)
    assert lr_at(12, p) == pytest.approx(5e-9 + (0.064 - 5e-9) * 12 / 25)
    assert lr_at(25, p) == lr_at(49, p) == 0.064
    assert lr_at(199, p) == pytest.approx(4.346e-4) and lr_at(124, p) < 0.064
    assert [beta_at(e, p) for e in (0, 24, 25, 34, 199)] == [0.0, 0.0, 0.0, 1.0, 1.0]
    assert beta_at(29, p) == pytest.approx(4 / 9)
    q = load_config(REPO / "configs/cifar10.yaml", ["purifier.beta_max=0.1"]).purifier  # a labelled departure
    assert [beta_at(e, q) for e in (24, 29, 34, 199)] == [0.0, pytest.approx(0.4 / 9), 0.1, 0.1]


@pytest.mark.parametrize("batch,frac,workers", [(5120, 0.5, 8), (2560, 0.15, 4), (1024, 0.01, 8), (256, 0.5, 2)])
def test_batch_composition_independent_of_workers(batch, frac, workers):
    whole = global_kinds(batch, frac)
    n_adv = round(batch * frac)
    counts = np.bincount(whole, minlength=5)
    assert counts[0] == batch - n_adv and counts[1:].sum() == n_adv and counts[1:].max() - counts[1:].min() <= 1
    parts = [worker_kinds(batch, frac, workers, r) for r in range(workers)]
    assert sorted(k for part in parts for k in part) == sorted(whole)
    if frac == 0.01:
        assert n_adv == 10 and sum(k != 0 for k in parts[0]) >= 1  # never rounds to zero per worker
    with pytest.raises(ValueError, match="divisible"):
        worker_kinds(batch + 1, frac, workers, 0)


def _synthetic_shards(n_shards=4, per_shard=20):
    """Image value = 1000*example + kind, so a batch tells which rows it was built from."""
    shards = []
    for s in range(n_shards):
        ex = np.arange(s * per_shard, (s + 1) * per_shard)
        vals = (1000 * ex[:, None] + np.arange(5)[None, :]).reshape(-1).astype(np.float32)
        shards.append(ShardData(images=vals[:, None, None, None], acts={"l": vals[:, None, None, None] + 0.5}))
    return shards


def test_a_split_shard_is_freed_and_the_buffer_is_capped_by_its_bytes():
    """The shuffle buffer holds copies of its examples, so a shard is freed once split (were the pool to hold
    views, one undrawn example would keep its whole shard: the WRN's purifier ran 24 GB out of memory so); and a
    worker's buffer holds at most BUFFER_BYTES of cached activations, a cap the default's 0.2 MB per example does
    not reach."""
    import gc
    import weakref

    from stages.purifier import BUFFER_BYTES, buffer_examples
    refs = []

    def load(k):
        data = _synthetic_shards()[k]
        data = ShardData(images=data.images.copy(), acts={n: a.copy() for n, a in data.acts.items()})
        refs.append(weakref.ref(data.images))  # the array that owns its bytes: a view of it keeps it alive
        return data

    bb = BalancedBatches(load, 4, batch_size=8, adv_fraction=0.5, workers=1, rank=0, steps=steps_per_epoch([20] * 4, 8, 1),
                         buffer_examples=30, seed=0)
    alive = []
    for b in bb.epoch(0):
        gc.collect()
        alive.append(sum(r() is not None for r in refs))
        assert b.acts["l"].shape == (8, 1, 1, 1)
    assert len(alive) == 10 and max(alive) <= 1, alive  # at most the shard loading next, never a drained one
    default = 219_605  # B per example of configs/fmnist.yaml (pipeline plan); the WRN-16-2's 14 layers: 1,944,405
    assert buffer_examples(128, 1000, 5000, default) == buffer_examples(128, 1000, 5000, 0) == 2500
    assert buffer_examples(128, 1000, 5000, 1_944_405) == BUFFER_BYTES // 1_944_405 == 552
    assert buffer_examples(128, 1000, 5000, 10 ** 10) == 128  # never less than one batch


def test_balanced_batches_rows_and_fractions():
    shards = _synthetic_shards()
    steps = steps_per_epoch([20] * 4, 8, 2)
    seen_kinds = np.zeros(5)
    for rank in range(2):
        bb = BalancedBatches(lambda k: shards[k], 4, batch_size=8, adv_fraction=0.5, workers=2, rank=rank,
                             steps=steps, buffer_examples=10, seed=0)
        batches = list(bb.epoch(0))
        assert len(batches) == steps == 10  # 40 examples per worker, 4 per worker batch
        examples = []
        for b in batches:
            ex_in, kind_in = np.divmod(b.inputs.ravel().astype(int), 1000)
            ex_t, kind_t = np.divmod(b.targets.ravel().astype(int), 1000)
            assert (ex_in == ex_t).all() and (kind_t == 0).all() and (kind_in == b.kinds).all()
            assert np.array_equal(b.acts["l"].ravel(), b.inputs.ravel() + 0.5)
            assert set(ex_in // 20) <= {rank, rank + 2}  # a worker reads only its shards
            examples += ex_in.tolist()
            seen_kinds += np.bincount(b.kinds, minlength=5)
        assert len(examples) == len(set(examples))  # each example at most once per epoch
        assert list(bb.epoch(1))[0].inputs.tolist() != batches[0].inputs.tolist()  # reshuffled per epoch
    assert seen_kinds[0] == seen_kinds[1:].sum() and len(set(seen_kinds[1:])) == 1
