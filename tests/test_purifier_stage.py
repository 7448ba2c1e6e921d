"""The purifier stage on a real local Ray instance (Ray Train, 2 CPU workers, gloo) from real shards."""
import json
import shutil
from functools import partial

import numpy as np
import pytest
import torch

from pipeline import runner
from tests import conftest
from tests.conftest import TOY_SETS, toy_store

# The shared toy store's classifier, shards, activations and 4-epoch purifier (its console: tests/test_whole_job.py).
SETS = TOY_SETS


@pytest.fixture(scope="module")
def data_dir(toy):
    return toy.data


make_ctx = partial(conftest.make_ctx, sets=SETS)


@pytest.fixture(scope="module")
def store(tmp_path_factory, toy):
    with toy_store(tmp_path_factory, toy, ignore=("logs", "evaluate", "baseline")) as root:
        yield root


def test_two_workers_train_checkpoint_and_loss_falls(store, data_dir):
    """The toy job's purifier, trained by the CLI's `--stage evaluate` on 2 Ray Train workers (48 steps with Lookahead's
    k=5: the last 3 are past a sync)."""
    from pipeline.models.purifier import PurifierSpec

    ctx = make_ctx(store, data_dir)
    out = ctx.output("purifier")
    assert out.is_complete()
    m = out.manifest()
    hist = [json.loads(line) for line in (out.dir / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in hist] == [1, 2, 3, 4] and all(h["workers"] == 2 for h in hist)
    assert hist[-1]["loss"] < hist[0]["loss"] and hist[-1]["reconstruction"] < hist[0]["reconstruction"]
    assert [h["beta"] for h in hist] == [0.0, 0.0, 0.5, 1.0] and hist[0]["examples"] == 384
    spec = PurifierSpec.from_json(m["model"])
    assert spec.to_json() == m["model"] == json.loads((out.dir / "purifier.json").read_text())
    model = spec.build()
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
    ctx.forget_keys()  # keys are computed once per run; a code change comes between runs
    after = ctx.output("activations")
    assert after.key != before.key and not after.is_complete()
    with pytest.raises(runner.UpstreamMissing):  # downstream keys follow: nothing old is served
        ctx.output("purifier")
    monkeypatch.undo()
    ctx.forget_keys()
    assert ctx.output("purifier").key == purifier_before


def test_the_purifier_key_holds_what_changes_its_weights_and_not_the_model_worker_count(store, data_dir):
    """1 and 2 Ray Train workers train different bytes (each rank reads its own shards and batches), so
    purifier.workers is in the key; ``--workers`` (model workers of the byte-invariant stages) is not, and does
    not change the purifier's count. A bfloat16 recompute conditions on other activations than a float32 one."""
    key = lambda *sets, workers=None: make_ctx(store, data_dir, *sets, workers=workers).key("purifier")
    assert key("purifier.workers=1") != key("purifier.workers=2")
    assert key(workers=1) == key(workers=2) == key()
    rec = "purifier.activations_source=recompute"
    assert key(rec, "activations.precision=bfloat16") != key(rec) != key()
    with pytest.raises(runner.UpstreamMissing):  # with the cache, the (bfloat16) activations' own key says it
        key("activations.precision=bfloat16")


def test_cache_and_recompute_condition_identically(store, data_dir):
    from pipeline.balanced import BalancedBatches, ShardLoader
    from pipeline.models import classifier_payload
    from pipeline.purifier_train import conditioning

    ctx = make_ctx(store, data_dir)
    attacks, acts = ctx.upstream("attacks"), ctx.upstream("activations")
    layers = ["conv1", "conv2", "conv3"]
    where = {"attacks_dir": str(attacks.dir), "layers": layers}
    classifier = classifier_payload(ctx.upstream("classifier"), ctx.cfg.data.dataset).build("cpu")

    def first_batch(source):
        cached = str(acts.dir) if source == "cache" else None
        bb = BalancedBatches(ShardLoader(**where, activations_dir=cached), 6, batch_size=32, adv_fraction=0.5, workers=1,
                             rank=0, steps=3, buffer_examples=64, seed=0)
        return next(iter(bb.epoch(0)))

    cached, fresh = first_batch("cache"), first_batch("recompute")
    assert np.array_equal(cached.inputs, fresh.inputs) and fresh.acts is None
    a = conditioning(cached, None, layers, "float16", "cpu")
    b = conditioning(fresh, classifier, layers, "float16", "cpu")
    assert all(x.dtype == torch.float16 and torch.equal(x, y) for x, y in zip(a, b))


def test_layer_subset_trains_from_only_its_arrays(store, data_dir, tmp_path):
    """``purifier.layers=[conv2]``: the model is conditioned on conv2 alone, and a whole epoch of every worker's
    batches (the purifier's own loader, as its Ray Train workers run it) reads conv2's chunks and no other layer's
    (the other layers' chunks are corrupted: a read would fail its sha256 check)."""
    from pipeline.balanced import BalancedBatches, ShardLoader, steps_per_epoch
    from stages.purifier import conditioning_layers, model_spec

    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    ctx = make_ctx(copy, data_dir, "purifier.layers=[conv2]")
    acts_dir = ctx.upstream("activations").dir
    for name in ("conv1", "conv3"):  # same sizes, other bytes
        for chunk in (acts_dir / "acts.zarr" / name / "c").rglob("*"):
            if chunk.is_file():
                blob = bytearray(chunk.read_bytes())
                blob[len(blob) // 2] ^= 0xFF
                chunk.write_bytes(bytes(blob))
    layers = conditioning_layers(ctx)
    assert layers == ["conv2"] and [k for k, _ in model_spec(ctx, layers).layer_shapes] == ["conv2"]
    attacks, p = ctx.upstream("attacks"), ctx.cfg.purifier
    examples = [u["stop"] - u["start"] for u in attacks.manifest()["units"]]
    steps = steps_per_epoch(examples, p.batch_size, p.workers)
    seen = 0
    for rank in range(p.workers):
        loader = ShardLoader(attacks_dir=str(attacks.dir), layers=layers, activations_dir=str(acts_dir))
        bb = BalancedBatches(loader, len(examples), batch_size=p.batch_size, adv_fraction=p.adv_fraction,
                             workers=p.workers, rank=rank, steps=steps, buffer_examples=64, seed=0)
        for batch in bb.epoch(0):
            assert list(batch.acts) == ["conv2"]
            seen += len(batch.inputs)
    assert seen == steps * p.batch_size > 0


@pytest.mark.slow
def test_resumed_training_is_bit_identical_to_an_uninterrupted_run(store, data_dir, tmp_path):
    """The state a kill leaves, and the same run again: its purifier.pt equals the uninterrupted run's (the module's
    4-epoch purifier, the toy job's), byte for byte. The state is the one the last checkpoint's
    write can be killed in (pipeline/store.py writes a file under a temporary name, renames it into place, then
    writes its receipt): the last epoch's checkpoint (``epoch-0003.pt``: files count epochs from 0) renamed but
    without its receipt, so it is not trusted, and a half-written temporary of it beside; no manifest, no
    purifier.pt. The run resumes after the third epoch with every worker's random state restored. A Ray Train worker lost inside a run resumes through the same path (train_loop reads
    the newest recorded checkpoint when the group restarts); stopping a running stage's processes is
    tests/test_faults.py's (SIGTERM to the driver and to its process group), so no process is killed here."""
    from stages.purifier import CKPT_DIR

    done = runner.run(make_ctx(store, data_dir), "purifier")[0]
    reference = (done.dir / "purifier.pt").read_bytes()
    copy = tmp_path / "killed"
    shutil.copytree(store, copy)
    out_dir = copy / done.dir.relative_to(store)
    for name in ("manifest.json", "purifier.pt", "purifier.json", "_units/epoch-0003.json"):
        (out_dir / name).unlink()
    ckpts = out_dir / CKPT_DIR
    assert sorted(p.name for p in ckpts.glob("epoch-*.pt")) == ["epoch-0002.pt", "epoch-0003.pt"]
    half = ckpts / ".epoch-0003.pt.tmp-1-0badf00d"
    half.write_bytes((ckpts / "epoch-0003.pt").read_bytes()[:4096])
    lines = []
    out = runner.run(make_ctx(copy, data_dir, log=lines.append), "purifier")[0]
    assert out.dir == out_dir and "[purifier] resuming from epoch-0002.pt" in lines, lines
    assert not half.exists()
    hist = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in hist] == list(range(1, 5))
    assert (out_dir / "purifier.pt").read_bytes() == reference


@pytest.mark.slow
def test_a_corrupt_shard_inside_ray_train_is_one_line(store, data_dir, tmp_path):
    """A store error raised inside the Ray Train workers reaches the driver as itself: one StoreError line naming
    the shard (the CLI prints a StoreError as its one error line, exit 1: tests/test_probes.py checks that), not
    Ray Train's worker-group traceback; no purifier folder is left behind. In this process, on the
    module's Ray (``--only``: the stage alone, as a cluster job runs it)."""
    from pipeline.store import StoreError

    copy = tmp_path / "store"
    shutil.copytree(store, copy, ignore=shutil.ignore_patterns("purifier"))
    (shard,) = copy.glob("fmnist/attacks/*/shard-000000.tar")
    blob = bytearray(shard.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    shard.write_bytes(bytes(blob))
    with pytest.raises(StoreError) as info:  # 2 workers: one meets it
        runner.run(make_ctx(copy, data_dir), "purifier", only=True)
    message = str(info.value)
    assert "\n" not in message and f"{shard}: content altered" in message, message
    assert not list(copy.glob("fmnist/purifier/*"))
