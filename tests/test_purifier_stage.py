"""The purifier stage on a real local Ray instance (Ray Train, 2 CPU workers, gloo) from real shards."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from pipeline import runner
from pipeline.config import load_config
from tests.conftest import REPO, built_store, make_fmnist

SETS = ["classifier.train.epochs=1", "classifier.train.batch_size=64", "data.test_subset=32", "attack.shard_size=64",
        "attack.batch_size=64", "attack.pgd_steps=3", "activations.chunk_rows=64", "purifier.batch_size=32",
        "purifier.epochs=4", "purifier.warmup_epochs=0", "purifier.plateau_epochs=2", "purifier.anneal_epochs=2",
        "purifier.beta_start_epoch=1", "purifier.beta_end_epoch=3", "purifier.plateau_lr=0.002",
        "purifier.final_lr=0.0005", "purifier.workers=2"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_fmnist(tmp_path_factory.mktemp("fx") / "fmnist", n_train=384, n_test=32)


def make_ctx(store, data_dir, *extra):
    cfg = load_config(REPO / "configs/fmnist.yaml", [f"data.data_dir={data_dir}", *SETS, *extra])
    ctx = runner.Context(cfg=cfg, store=runner.store_root(store), log=lambda m: None)
    return ctx


@pytest.fixture(scope="module")
def store(tmp_path_factory, data_dir):
    with built_store(tmp_path_factory, make_ctx, data_dir, ("classifier", "attacks", "activations")) as root:
        yield root


@pytest.mark.slow
def test_two_workers_train_checkpoint_and_loss_falls(store, data_dir):
    from stages.purifier import _build

    ctx = make_ctx(store, data_dir, "purifier.lookahead_k=5")  # 48 steps: the last 3 are past a Lookahead sync
    ctx._ray_ready = True
    out = runner.run(ctx, "purifier")[0]
    m = out.manifest()
    hist = [json.loads(line) for line in (out.dir / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in hist] == [1, 2, 3, 4] and all(h["workers"] == 2 for h in hist)
    assert hist[-1]["loss"] < hist[0]["loss"] and hist[-1]["reconstruction"] < hist[0]["reconstruction"]
    assert [h["beta"] for h in hist] == [0.0, 0.0, 0.5, 1.0] and hist[0]["examples"] == 384
    model = _build({"model": m["model"]})
    model.load_state_dict(torch.load(out.dir / "purifier.pt", weights_only=True))
    assert m["counts"]["parameters"] == sum(p.numel() for p in model.parameters())
    assert (out.dir / "checkpoints").is_dir()
    # The purifier kept is Lookahead's slow weights of the last epoch, not the fast ones.
    from stages.purifier import latest_checkpoint

    final = torch.load(out.dir / "purifier.pt", weights_only=True)
    last = torch.load(latest_checkpoint(out.dir), weights_only=True)
    assert all(torch.equal(final[k], v) for k, v in last["slow_model"].items())
    assert any(not torch.equal(final[k], last["model"][k]) for k in final)
    # Collapse diagnostics per epoch; the manifest records the code version.
    assert all(len(h["kl_per_dim"]) == ctx.cfg.purifier.f_joint and 0 <= h["active_units"] <= 64 for h in hist)
    assert abs(sum(hist[-1]["kl_per_dim"]) - hist[-1]["kl"]) < 1e-3
    assert m["code_version"] == runner.stage_module("purifier").VERSION


def test_a_code_version_bump_is_never_a_cache_hit(store, data_dir, monkeypatch):
    import stages.activations

    ctx = make_ctx(store, data_dir)
    before = ctx.output("activations")
    purifier_before = ctx.output("purifier").key
    assert before.is_complete() and before.manifest()["code_version"] == stages.activations.VERSION
    monkeypatch.setattr(stages.activations, "VERSION", stages.activations.VERSION + 1)  # a code change
    after = ctx.output("activations")
    assert after.key != before.key and not after.is_complete()
    with pytest.raises(runner.UpstreamMissing):  # downstream keys follow: nothing old is served
        ctx.output("purifier")
    monkeypatch.undo()
    assert ctx.output("purifier").key == purifier_before


def test_cache_and_recompute_condition_identically(store, data_dir):
    from pipeline.balanced import BalancedBatches
    from stages import _pool
    from stages.purifier import _conditioning, _ShardLoader

    ctx = make_ctx(store, data_dir)
    attacks, acts = ctx.upstream("attacks"), ctx.upstream("activations")
    layers = ["conv1", "conv2", "conv3"]
    base = {"attacks_dir": str(attacks.dir), "activations_dir": str(acts.dir), "layers": layers, "cache_bytes": 0}
    classifier = _pool.build_model(_pool.model_payload(ctx.upstream("classifier"), ctx.cfg), "cpu")

    def first_batch(source):
        bb = BalancedBatches(_ShardLoader({**base, "source": source}), 6, batch_size=32, adv_fraction=0.5, workers=1,
                             rank=0, steps=3, buffer_examples=64, seed=0)
        return next(iter(bb.epoch(0)))

    cached, fresh = first_batch("cache"), first_batch("recompute")
    assert np.array_equal(cached.inputs, fresh.inputs) and fresh.acts is None
    a = _conditioning(cached, None, layers, "float16", "cpu")
    b = _conditioning(fresh, classifier, layers, "float16", "cpu")
    assert all(x.dtype == torch.float16 and torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.slow
def test_layer_subset_trains_from_only_its_arrays(store, data_dir, tmp_path):
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    ctx = make_ctx(copy, data_dir, "purifier.layers=[conv2]", "purifier.epochs=1", "purifier.plateau_epochs=1",
                   "purifier.anneal_epochs=0", "purifier.beta_start_epoch=0", "purifier.beta_end_epoch=0")
    acts_dir = ctx.upstream("activations").dir
    shutil.rmtree(acts_dir / "acts.zarr" / "conv1")  # any read of these would fail
    shutil.rmtree(acts_dir / "acts.zarr" / "conv3")
    ctx._ray_ready = True
    out = runner.run(ctx, "purifier")[0]
    assert out.manifest()["model"]["layers"] == ["conv2"]
    assert list(out.manifest()["model"]["layer_shapes"]) == ["conv2"]


def _cli_args(store, data_dir, *extra):
    sets = [a for s in [f"data.data_dir={data_dir}", *SETS, *extra] for a in ("--set", s)]
    return ["--config", "configs/fmnist.yaml", "--store", str(store), *sets]


@pytest.mark.slow
def test_killed_training_resumes_from_last_checkpoint(store, data_dir, tmp_path):
    copy = tmp_path / "store"
    shutil.copytree(store, copy, ignore=shutil.ignore_patterns("purifier"))  # no other run's checkpoints
    extra = ["purifier.epochs=30", "purifier.anneal_epochs=28"]
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", "--stage", "purifier",
                             *_cli_args(copy, data_dir, *extra)], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline, ck = time.time() + 240, None
    while time.time() < deadline and proc.poll() is None:
        found = sorted(copy.glob("fmnist/purifier/*/checkpoints/epoch-*.pt"))
        if any(p.name >= "epoch-0001.pt" for p in found):
            ck = found[-1]
            break
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert ck is not None, "no checkpoint appeared"
    out_dir = ck.parent.parent
    assert not (out_dir / "manifest.json").exists()
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "--stage", "purifier",
                        *_cli_args(copy, data_dir, *extra)], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from epoch-" in r.stderr
    hist = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in hist] == list(range(1, 31))
    assert json.loads((out_dir / "manifest.json").read_text())["counts"]["epochs"] == 30
