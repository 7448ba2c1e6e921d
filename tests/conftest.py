"""Shared fixtures: small on-disk datasets in every supported format, built by the tests themselves, and the two
ways tests drive the pipeline: a ``Context`` on the test's own Ray (``make_ctx``) and the real CLI in a
subprocess (``cli``, with ``cli_args`` for the usual config, store and overrides; ``cli_here`` in this process
for a command that ends before anything runs)."""
from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import signal
import struct
import subprocess
import sys
import tarfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

# The two test processes share the cores with the Ray workers they start, so OpenMP threads routinely wait for a
# core. libgomp's default is to spin while waiting, which burns the time the other process needs: measured on 2
# cores, two concurrent 2-thread torch loops took 2.1x as long with spinning as with passive waiting (alone,
# passive was 7% slower). Set before torch is imported anywhere; inherited by the CLI runs, Ray and its workers.
# The wait policy does not change how work is split between threads, so no number changes (the suite's
# byte-identity tests would say so). The pipeline itself keeps the default: it sizes its workers to the cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/fmnist.yaml"


# The modules that take longest, longest first: the two test processes (pyproject.toml: xdist, whole modules, in
# this order) start on the first two, and the short modules fill in around them. test_purifier_stage builds the
# shared toy store (``toy``) at the start, while the other process runs scenario (a), which does not need it; the
# other modules reading the toy store come last (LATE_MODULES), so no process waits idle for it.
HEAVY_MODULES = ["test_scenario_a.py", "test_purifier_stage.py", "test_precompute.py", "test_cluster.py",
                 "test_faults.py", "test_probes.py", "test_classifier_stage.py"]
LATE_MODULES = ["test_evaluate_stage.py", "test_probe_stage.py", "test_key_contract.py", "test_whole_job.py"]


def pytest_collection_modifyitems(items):
    order = [*HEAVY_MODULES, None, *LATE_MODULES]  # None: every other module, in collection order
    rank = {name: i for i, name in enumerate(order)}
    items.sort(key=lambda item: rank.get(item.path.name, order.index(None)))  # stable: modules stay whole


def cli(*args, cwd=REPO, **kw) -> subprocess.CompletedProcess:
    """``pipeline ARGS`` in a subprocess, as a user runs it; output captured as text."""
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True, cwd=cwd, **kw)


def cli_here(*args) -> subprocess.CompletedProcess:
    """``pipeline ARGS`` run by click in this process, for a command that must end before any stage or Ray starts
    (a bad config, an unknown layer, a bad store path): the same code as ``cli`` without a new interpreter's ~3 s
    of imports. What a command sets process-wide (its SIGTERM handler, Ray's post-init hooks, the space check) is
    put back afterwards, and a command that started Ray here fails the test (where the module holds a Ray
    connection already, that check cannot see a command that used it)."""
    import ray
    from click.testing import CliRunner
    from ray._private import worker

    from pipeline import cli as cli_module
    from pipeline import preflight

    connected = ray.is_initialized()  # a module's own Ray (a stage it ran): the command must not start another
    saved = (signal.getsignal(signal.SIGTERM), list(worker._post_init_hooks), preflight.SPACE_CHECK, os.getcwd())
    try:
        os.chdir(REPO)
        r = CliRunner().invoke(cli_module.main, list(args), prog_name="pipeline")
    finally:
        signal.signal(signal.SIGTERM, saved[0])
        worker._post_init_hooks[:] = saved[1]
        preflight.SPACE_CHECK = saved[2]
        os.chdir(saved[3])
    started = ray.is_initialized() and not connected
    if started:
        ray.shutdown()
    assert not started, f"pipeline {' '.join(args)}: started Ray; run it with cli() instead"
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return subprocess.CompletedProcess(list(args), r.exit_code, r.stdout, r.stderr)


def start_cli(*args, stderr=subprocess.DEVNULL) -> subprocess.Popen:
    """``pipeline ARGS`` started in its own process group (so a test can kill it with everything it started)."""
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=stderr, text=True, start_new_session=True)


def wait_for(root: Path, pattern: str, proc: subprocess.Popen, until=None) -> list[Path]:
    """Block until files matching ``pattern`` under ``root`` exist (and satisfy ``until(found)``), polling while
    ``proc`` runs: an event, not a deadline, so a slow machine only waits longer. [] if the run ended first."""
    while proc.poll() is None:
        found = sorted(root.glob(pattern))
        if found and (until is None or until(found)):
            return found
        time.sleep(0.05)
    return []


def kill_group(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def cli_args(store, data_dir, *extra, sets=(), config: str = CONFIG) -> list[str]:
    """``--config``, ``--store`` and one ``--set`` per override: the data folder, ``sets`` (a module's usual
    overrides, e.g. through ``functools.partial``), then ``extra``."""
    pairs = [a for s in [f"data.data_dir={data_dir}", *sets, *extra] for a in ("--set", s)]
    return ["--config", config, "--store", str(store), *pairs]


def make_ctx(store, data_dir, *extra, sets=(), workers=None, log=None, config: str = CONFIG):
    """A run context on ``config`` with the data folder, ``sets`` and ``extra`` as overrides. The first stage that
    needs Ray connects this process to a local instance (``Context.ray``), which stays up for the module: its
    store fixture (``toy_store``) shuts it down. A test that never reaches a Ray task starts none."""
    from pipeline import runner
    from pipeline.config import load_config

    cfg = load_config(REPO / config, [f"data.data_dir={data_dir}", *sets, *extra])
    return runner.Context(cfg=cfg, store=runner.store_root(store), workers=workers, log=log or (lambda m: None))


def write_idx(path: Path, arr: np.ndarray, gz: bool = True) -> None:
    code = {np.uint8: 0x08}[arr.dtype.type]
    raw = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()
    if gz:
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)


def make_fmnist(root: Path, n_train: int = 64, n_test: int = 32, seed: int = 0, gz: bool = True) -> Path:
    """IDX files like Debian's dataset-fashion-mnist; images are class-dependent so a model can learn them."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        y = rng.integers(0, 10, size=n).astype(np.uint8)
        x = rng.integers(0, 60, size=(n, 28, 28)).astype(np.uint8)
        for i, c in enumerate(y):  # a bright bar whose position encodes the class
            x[i, 2 + 2 * c:4 + 2 * c, 4:24] = 230
        write_idx(root / f"{prefix}-images-idx3-ubyte", x, gz)
        write_idx(root / f"{prefix}-labels-idx1-ubyte", y, gz)
    return root


def cifar_batch(n: int, label_key: str, num_classes: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    d = {b"batch_label": b"fixture", b"data": rng.integers(0, 256, size=(n, 3072)).astype(np.uint8),
         label_key.encode(): [int(v) for v in rng.integers(0, num_classes, size=n)]}
    return pickle.dumps(d, protocol=2)


def make_cifar10(root: Path, n: int = 8, archive: bool = False) -> Path:
    files = {f"data_batch_{i}": cifar_batch(n, "labels", 10, i) for i in range(1, 6)}
    files["test_batch"] = cifar_batch(n, "labels", 10, 99)
    _write_cifar(root, "cifar-10-batches-py", "cifar-10-python.tar.gz", files, archive)
    return root


def make_cifar100(root: Path, n: int = 8, archive: bool = False) -> Path:
    files = {"train": cifar_batch(n, "fine_labels", 100, 1), "test": cifar_batch(n, "fine_labels", 100, 2)}
    _write_cifar(root, "cifar-100-python", "cifar-100-python.tar.gz", files, archive)
    return root


def _write_cifar(root: Path, folder: str, archive_name: str, files: dict[str, bytes], archive: bool) -> None:
    root.mkdir(parents=True, exist_ok=True)
    if archive:
        with tarfile.open(root / archive_name, "w:gz") as tf:
            for name, blob in files.items():
                ti = tarfile.TarInfo(f"{folder}/{name}")
                ti.size = len(blob)
                tf.addfile(ti, io.BytesIO(blob))
    else:
        (root / folder).mkdir(parents=True, exist_ok=True)
        for name, blob in files.items():
            (root / folder / name).write_bytes(blob)


def make_tinyimagenet(root: Path, wnids=("n01443537", "n01629819"), per_class: int = 3) -> Path:
    from PIL import Image

    base = root / "tiny-imagenet-200"
    rng = np.random.default_rng(0)
    (base / "val" / "images").mkdir(parents=True, exist_ok=True)
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    ann = []
    for c, w in enumerate(wnids):
        d = base / "train" / w / "images"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(d / f"{w}_{i}.JPEG", "JPEG")
        name = f"val_{c}.JPEG"
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(base / "val" / "images" / name, "JPEG")
        ann.append(f"{name}\t{w}\t0\t0\t63\t63")
    (base / "val" / "val_annotations.txt").write_text("\n".join(ann) + "\n")
    return root


@pytest.fixture
def fmnist_dir(tmp_path) -> Path:
    return make_fmnist(tmp_path / "fmnist")


# The toy job every store-reading module shares: the default config at toy size (one PGD-7 epoch of the SmallCNN on
# 384 images, 3-step training attacks in 64-example shards, a 4-epoch purifier on 2 Ray Train workers whose last
# steps are past a Lookahead sync (tests/test_purifier_stage.py reads it), 12 test points at 1-3 attack steps).
# TOY_JOB is what the shared store's job ran (``toy``: an evaluation of 4 points; tests/test_evaluate_stage.py
# evaluates the 12).
TOY_CLASSIFIER = ["classifier.train.epochs=1", "classifier.train.batch_size=32", "classifier.train.eval_pgd_steps=2",
                  "data.test_subset=64"]
TOY_SETS = ["attack.n_examples=null", *TOY_CLASSIFIER, "attack.shard_size=64", "attack.batch_size=64", "attack.pgd_steps=3",
            "activations.chunk_rows=64", "purifier.batch_size=32", "purifier.epochs=4", "purifier.warmup_epochs=0",
            "purifier.plateau_epochs=2", "purifier.anneal_epochs=2", "purifier.beta_start_epoch=1",
            "purifier.beta_end_epoch=3", "purifier.plateau_lr=0.002", "purifier.final_lr=0.0005",
            "purifier.lookahead_k=5", "purifier.workers=2", "eval.n_examples=12", "eval.chunk_size=4",
            "eval.samples=2", "eval.aa_steps=3", "eval.aa_eot=2", "eval.pgd_eot_steps=3", "eval.pgd_eot_iters=2",
            "eval.fresh_draws=2", "eval.batch_size=8"]
TOY_JOB = [*TOY_SETS, "eval.n_examples=4"]
TOY_TRAIN, TOY_TEST = 384, 64


def shared_dir(tmp_path_factory, name: str, build) -> Path:
    """A folder built once per test run and shared by every test process (the pytest-xdist workers): the first
    to ask builds it with ``build(folder)`` under a file lock, the others wait for it. Tests copy from it and
    never write into it."""
    import fcntl
    import shutil

    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    folder, done = root / f"shared-{name}", root / f"shared-{name}.built"
    with open(root / f"shared-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            done.touch()
    return folder


class Toy:
    """The shared toy job: its data folder, its store (classifier, attacks, activations, purifier and a 4-point
    evaluation, every one made by the CLI as a user makes them) and the console of the runs that built it."""

    def __init__(self, folder: Path):
        self.data, self.store = folder / "fmnist", folder / "store"
        self.runs = json.loads((folder / "runs.json").read_text())


def _build_toy(folder: Path) -> None:
    data = make_fmnist(folder / "fmnist", n_train=TOY_TRAIN, n_test=TOY_TEST)
    args = cli_args(folder / "store", data, sets=TOY_JOB)
    runs = {}
    # As tests/test_whole_job.py reads them: --only refuses upstream work; then, like make, `--stage evaluate`
    # runs every stage it needs, which on an empty store is the whole job. The refusal ends before Ray starts, so
    # it runs in this process (cli_here); the job is the user's CLI.
    for name, stage in (("only", ["--stage", "attacks", "--only"]), ("job", ["--stage", "evaluate"])):
        r = (cli_here if name == "only" else cli)("run", *stage, *args)
        runs[name] = {"returncode": r.returncode, "stdout": r.stdout, "stderr": r.stderr}
    (folder / "runs.json").write_text(json.dumps(runs))


@pytest.fixture(scope="session")
def toy(tmp_path_factory) -> Toy:
    t = Toy(shared_dir(tmp_path_factory, "toy", _build_toy))
    assert t.runs["job"]["returncode"] == 0, "the shared toy job failed: " + t.runs["job"]["stderr"][-3000:]
    return t


# The toy job's classifier (one PGD-7 epoch on its 384 training images), with attacks on its first 64 training
# images only: for the fault, cluster and bad-input tests, whose attack runs must stay short.
CLF = [*TOY_CLASSIFIER, "attack.n_examples=64"]


@pytest.fixture(scope="session")
def trained_classifier(tmp_path_factory, toy):
    """(the toy's data folder, a store holding only the toy job's classifier): the pipeline's own cache, so a
    stage run with CLF finds it. Tests copy the store."""
    import shutil

    def build(folder: Path) -> None:
        (out,) = (toy.store / "fmnist" / "classifier").iterdir()
        shutil.copytree(out, folder / "fmnist" / "classifier" / out.name)

    return toy.data, shared_dir(tmp_path_factory, "trained", build)


@contextmanager
def toy_store(tmp_path_factory, toy: Toy, ignore=("logs",)):
    """A module's own copy of the shared toy store (the module's tests may write into it). Ray starts when a test's
    stage first needs it (``make_ctx``) and is shut down with the module."""
    import shutil

    import ray

    root = tmp_path_factory.mktemp("store")
    shutil.copytree(toy.store, root, dirs_exist_ok=True, ignore=shutil.ignore_patterns(*ignore))
    try:
        yield root
    finally:
        ray.shutdown()
