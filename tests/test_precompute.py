"""The precomputed adversarial datasets: attack shards (WebDataset) and hooked activations (Zarr), on a real
local Ray instance and a real store: the shared toy job's (tests/conftest.py: 384 training images, 6 shards of 64
examples, 3-step PGD), which the CLI wrote as a user's run does."""
import json
import shutil
import tarfile

import numpy as np
import pytest
import torch

from pipeline import runner
from pipeline.attacks import KINDS
from pipeline.config import load_config
from pipeline.data import load_split, to_float
from pipeline.shards import read_shard
from pipeline.store import StoreError
from pipeline.zarr_store import ActivationReader
from tests import conftest
from tests.conftest import REPO, TOY_SETS, TOY_TRAIN, cli_here, toy_store

N, SHARD = TOY_TRAIN, 64  # the toy's training examples and its attack.shard_size
SHARDS = N // SHARD


@pytest.fixture(scope="module")
def data_dir(toy):
    return toy.data


@pytest.fixture(scope="module")
def ray_local():
    from pipeline.cluster import connect

    connect(None, log=lambda m: None)
    yield
    import ray

    ray.shutdown()


def make_ctx(store, data_dir, *extra, workers=None):
    logs = []
    return conftest.make_ctx(store, data_dir, *extra, sets=TOY_SETS, workers=workers, log=logs.append), logs


@pytest.fixture(scope="module")
def built(tmp_path_factory, toy, data_dir):
    """The module's copy of the toy store's classifier, attacks and activations (tests may write into it)."""
    with toy_store(tmp_path_factory, toy, ignore=("logs", "purifier", "evaluate", "baseline")) as store:
        ctx, _ = make_ctx(store, data_dir)
        outs = {s: ctx.output(s) for s in ("classifier", "attacks", "activations")}
        assert all(o.is_complete() for o in outs.values())
        yield {"store": store, "ctx": ctx, "outs": outs}


@pytest.mark.slow
def test_a_user_error_raised_in_a_ray_task_reaches_the_driver_as_itself(ray_local):
    """Through a real Ray task (tests/test_faults.py has the other ways across)."""
    import ray

    from pipeline.errors import DiskFull, find_user_error

    @ray.remote
    def fails():
        raise DiskFull("/s/fmnist/attacks/k/shard-000001.tar: no space left on device (0 B free there)")

    with pytest.raises(Exception) as e:
        ray.get(fails.remote())
    err = find_user_error(e.value)
    assert type(err) is DiskFull and str(err).endswith("(0 B free there)") and err.exit_code == 1


@pytest.mark.slow
def test_a_local_instance_runs_outside_the_drivers_process_group(ray_local):
    """A SIGTERM to the driver's process group reaches the driver alone, which stops Ray itself after the stage
    (tests/test_faults.py sends one to the group): no process of the local instance shares the driver's group."""
    import os

    import ray

    from pipeline.cluster import _descendants

    @ray.remote
    def group():
        return os.getpgid(0)

    own = os.getpgid(0)
    groups = []
    for pid in _descendants():
        try:
            groups.append(os.getpgid(pid))
        except ProcessLookupError:
            pass
    assert len(groups) >= 2 and own not in groups, (own, groups)  # at least the GCS and the raylet
    assert ray.get(group.remote()) != own


def _shards(out):
    return sorted(out.dir.glob("shard-*.tar"))


@pytest.mark.slow
def test_attack_shards_round_trip(built, data_dir):
    out, cfg = built["outs"]["attacks"], built["ctx"].cfg
    x, y = load_split("fmnist", "train", str(data_dir))
    samples = [s for p in _shards(out) for s in read_shard(p)]
    assert len(samples) == 5 * N and out.manifest()["counts"] == {"examples": N, "samples": 5 * N, "shards": SHARDS,
                                                                  "shard_size": SHARD}
    eps = {"clean": 0.0, "fgsm_half": cfg.attack.eps / 2, "fgsm": cfg.attack.eps, "pgd_half": cfg.attack.eps / 2,
           "pgd": cfg.attack.eps}
    changed = 0
    for r, s in enumerate(samples):
        i = r // 5
        assert (s["index"], s["label"], s["kind"]) == (i, int(y[i]), KINDS[r % 5])
        clean = to_float(x[i])
        img = torch.from_numpy(s["image"])
        assert img.dtype == torch.float32 and img.min() >= 0 and img.max() <= 1
        # The same float32 arithmetic as the projection: stored images sit exactly inside the ball.
        assert bool((img <= clean + eps[s["kind"]]).all() and (img >= clean - eps[s["kind"]]).all()), s["kind"]
        changed += int(not torch.equal(img, clean))
    assert changed >= 4 * N * 0.9  # the attacks did perturb


@pytest.mark.slow
def test_shard_members_need_no_pickle(built):
    for p in _shards(built["outs"]["attacks"]):
        with tarfile.open(p) as tf:
            for m in tf.getmembers():
                blob = tf.extractfile(m).read()
                assert m.name.endswith((".img.npy", ".json")) and m.mtime == 0
                if m.name.endswith(".npy"):
                    import io

                    np.load(io.BytesIO(blob), allow_pickle=False)
                else:
                    json.loads(blob)


@pytest.mark.slow
def test_activations_round_trip_and_alignment(built):
    from pipeline.models import load_stored
    from pipeline.models.hooks import forward_with_activations

    acts, attacks = built["outs"]["activations"], built["outs"]["attacks"]
    reader = ActivationReader(acts)
    assert reader.layers == ["conv1", "conv2", "conv3"] and reader.n_rows == 5 * N
    rows = reader.read(0, 5 * N)
    samples = [s for p in _shards(attacks) for s in read_shard(p)]
    images = torch.from_numpy(np.stack([s["image"] for s in samples]))
    model, _ = load_stored(built["outs"]["classifier"], built["ctx"].cfg.data.dataset)
    with torch.no_grad():
        _, ref = forward_with_activations(model, images, reader.layers)
    for name, r in zip(reader.layers, ref):
        assert rows[name].dtype == np.float16 and rows[name].shape == tuple(r.shape)
        assert np.array_equal(rows[name], r.numpy().astype(np.float16)), name
    assert rows["label"].tolist() == [s["label"] for s in samples]
    assert [KINDS[k] for k in rows["kind"]] == [s["kind"] for s in samples]
    assert rows["index"].tolist() == [s["index"] for s in samples]


@pytest.mark.slow
def test_layer_subset_reads_only_its_arrays(built, tmp_path):
    acts = built["outs"]["activations"]
    copy = tmp_path / "acts"
    shutil.copytree(acts.dir, copy)
    from pipeline.store import Output

    out = Output(copy, "activations", acts.key)
    shutil.rmtree(copy / "acts.zarr" / "conv1")  # unreadable if touched
    shutil.rmtree(copy / "acts.zarr" / "conv3")
    rows = ActivationReader(out, ["conv2"]).read(0, 5 * N)
    assert set(rows) == {"conv2", "label", "kind", "index"} and rows["conv2"].shape == (5 * N, 32, 14, 14)
    with pytest.raises(StoreError, match="conv9"):
        ActivationReader(out, ["conv9"])


@pytest.mark.slow
def test_cache_hit_and_key_reuse(built, data_dir):
    store = built["store"]
    ctx, logs = make_ctx(store, data_dir)
    outs = runner.run(ctx, "activations")
    assert "cache hit" in logs[-1]
    assert outs[0].dir == built["outs"]["activations"].dir
    # Downstream-only changes reuse every upstream key.
    ctx2, _ = make_ctx(store, data_dir, "purifier.fc_repr=64", "eval.samples=4", "purifier.layers=[conv1]")
    for s in ("classifier", "attacks", "activations"):
        assert ctx2.output(s).dir == built["outs"][s].dir
    assert ctx2.output("purifier").dir != ctx.output("purifier").dir
    # A layer list enters keys resolved: the explicit default list is the same output as null.
    ctx3, _ = make_ctx(store, data_dir, "purifier.layers=[conv1,conv2,conv3]", "activations.layers=[conv1,conv2,conv3]")
    ctx4, _ = make_ctx(store, data_dir, "purifier.layers=null")
    for s in ("activations", "purifier"):  # the evaluate key derives from the purifier key
        assert ctx3.output(s).dir == ctx4.output(s).dir
    assert ctx4.output("purifier").dir != ctx.output("purifier").dir  # the default conditions on conv3 only


@pytest.mark.slow
def test_stale_keys_miss(built, data_dir):
    store = built["store"]
    ctx, _ = make_ctx(store, data_dir, "attack.eps=0.05")
    assert ctx.output("classifier").dir == built["outs"]["classifier"].dir
    assert ctx.output("attacks").dir != built["outs"]["attacks"].dir
    ctx, _ = make_ctx(store, data_dir, "attack.eps_scaling=std")
    assert ctx.output("attacks").dir != built["outs"]["attacks"].dir
    # New classifier weights (another training seed) -> a new classifier, hence new attack/activation keys.
    ctx, _ = make_ctx(store, data_dir, "classifier.train.seed=1")
    runner.run(ctx, "classifier")
    assert ctx.upstream("classifier").manifest()["weights_sha256"] != \
        built["outs"]["classifier"].manifest()["weights_sha256"]
    assert ctx.output("attacks").dir != built["outs"]["attacks"].dir


@pytest.mark.slow
def test_same_bytes_whatever_the_worker_count(built, data_dir, tmp_path):
    """The toy's shards came from one attacks actor; two actors, sharing the units, write the same bytes."""
    clf = built["outs"]["classifier"].dir
    shutil.copytree(clf, tmp_path / "s2" / clf.relative_to(built["store"]))  # the same classifier, from the cache
    ctx, logs = make_ctx(tmp_path / "s2", data_dir, workers=2)
    out = runner.run(ctx, "attacks", only=True)[0]
    assert any(line.startswith(f"[attacks] {SHARDS} unit(s) to do on 2 worker(s)") for line in logs), logs
    assert out.key == built["outs"]["attacks"].key
    a, b = _shards(built["outs"]["attacks"]), _shards(out)
    assert [p.name for p in a] == [p.name for p in b]
    assert all(pa.read_bytes() == pb.read_bytes() for pa, pb in zip(a, b))


@pytest.mark.slow
def test_an_interrupted_stage_resumes_to_identical_output(built, data_dir, tmp_path):
    """What a killed attacks run leaves (the kill itself, SIGTERM to the driver and to its process group, is
    tests/test_faults.py's, through the same receipts): finished units with their receipts, a shard written whose
    receipt was not (killed between the two writes), a half-written temporary, no manifest. The same stage
    resumes: it keeps the units with receipts, redoes the others, removes the temporary, and its shards and
    manifest files equal the uninterrupted run's byte for byte."""
    ref = built["outs"]["attacks"]
    store = tmp_path / "store"
    shutil.copytree(built["store"], store, ignore=shutil.ignore_patterns("activations"))
    ctx, logs = make_ctx(store, data_dir)
    out = ctx.output("attacks")
    shards = _shards(out)
    assert len(shards) == SHARDS
    out.manifest_path.unlink()
    (out.dir / "_units" / f"{shards[1].stem}.json").unlink()  # shard 1 written, its receipt not
    shards[2].unlink()
    (out.dir / "_units" / f"{shards[2].stem}.json").unlink()
    half = out.dir / f".{shards[2].name}.tmp-4242-0123abcd"  # shard 2 half-written by a writer that died
    half.write_bytes(shards[0].read_bytes()[:5000])
    runner.run(ctx, "attacks", only=True)
    assert f"[attacks] resuming {out.dir}: {SHARDS - 2} unit(s) already finished" in logs
    assert any(line.startswith("[attacks] 2 unit(s) to do") for line in logs), logs
    assert not half.exists() and not list(out.dir.glob(".*tmp*"))
    assert [p.read_bytes() for p in _shards(out)] == [p.read_bytes() for p in _shards(ref)]
    assert out.manifest()["files"] == ref.manifest()["files"]


@pytest.mark.slow
def test_verify_reports_truncated_and_flipped_shards(built, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(built["store"], store, ignore=shutil.ignore_patterns("activations"))
    assert cli_here("verify", "--store", str(store)).returncode == 0
    shards = sorted(store.glob("fmnist/attacks/*/shard-*.tar"))
    shards = [p for p in shards if p.parent.name == built["outs"]["attacks"].key]
    data = shards[0].read_bytes()
    shards[0].write_bytes(data[:-1000])
    blob = bytearray(shards[1].read_bytes())
    blob[len(blob) // 2] ^= 0x01
    shards[1].write_bytes(bytes(blob))
    r = cli_here("verify", "--store", str(store))
    assert r.returncode == 1
    assert f"{shards[0]}: truncated" in r.stderr and f"{shards[1]}: content altered" in r.stderr


@pytest.mark.slow
def test_reading_stage_refuses_a_corrupt_shard(built, data_dir, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(built["store"], store)
    ctx, _ = make_ctx(store, data_dir)
    shutil.rmtree(ctx.output("activations").dir)
    shard = sorted(ctx.upstream("attacks").dir.glob("shard-*.tar"))[1]
    blob = bytearray(shard.read_bytes())
    blob[700] ^= 0xFF
    shard.write_bytes(bytes(blob))
    with pytest.raises(Exception, match=f"{shard.name}: content altered"):
        runner.run(ctx, "activations")


@pytest.mark.slow
def test_sizes_match_the_storage_layout_arithmetic(built):
    from pipeline.sizing import estimate

    # The toy has 384 training images; the estimate knows only the config, so tell it.
    est = estimate(load_config(REPO / "configs/fmnist.yaml", [*TOY_SETS, f"attack.n_examples={N}"]))
    out = built["outs"]["attacks"]
    assert sum(p.stat().st_size for p in _shards(out)) == est["attack_total_bytes"]
    assert out.manifest()["counts"]["samples"] == est["samples"]
    acts = built["outs"]["activations"].manifest()
    assert acts["counts"]["bytes_per_row_raw"] + 17 == est["activation_row_bytes"]


def test_a_chunk_equal_to_the_fill_value_is_still_written(tmp_path):
    """All-zero rows (labels of class 0, a dead ReLU map) still get their chunk file, which receipts list."""
    from pipeline import zarr_store

    zarr_store.create(tmp_path, n_rows=20, shapes={"conv1": (2, 3, 3)}, dtype="float16", chunk_rows=10, clevel=3,
                      attrs={})
    zarr_store.write_rows(tmp_path, 0, {"conv1": np.zeros((20, 2, 3, 3), np.float16), "label": np.zeros(20, np.int64)})
    for name, ndim in (("conv1", 4), ("label", 1)):
        assert all(p.is_file() for p in zarr_store.chunk_files(tmp_path, name, ndim, 0, 2)), name
