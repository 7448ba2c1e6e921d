"""The faults a cluster user meets first, met as a new user would: a full disk, a store too small for the plan, a
scheduler's SIGTERM. Each is one line and a documented exit code (1 full disk, 2 store too small, 143 SIGTERM),
leaves nothing a later run could take for finished, and the same command resumes.

The disk is really full: a size-limited tmpfs the test mounts (root, as on CI); where mounting is not allowed those
tests skip, and the injected-error tests below still cover the code path. SIGTERM is a real signal to a real CLI
run on a real local Ray instance, sent to its whole process group (what `ray job stop` sends; the instance runs
outside that group, so it is what the driver alone receives from a `kill`).
"""
import errno
import json
import os
import pickle
import secrets
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import DiskFull, UserError, find_user_error
from pipeline.store import TEMP_MARK, atomic_file, atomic_write_bytes, sha256_file
from tests.conftest import CLF, REPO, cli, cli_args, cli_here

# 64 training images in 8 shards of 8 (205 KB each), cheap attacks: the full-disk run.
SMALL = [*CLF, "attack.shard_size=8", "attack.batch_size=8", "attack.pgd_steps=2", "activations.chunk_rows=40"]
# 16 shards of 4 at 40 PGD steps: slow enough to be stopped in the middle.
SLOW = [*CLF, "attack.shard_size=4", "attack.batch_size=4", "attack.pgd_steps=40", "activations.chunk_rows=20"]
DUMP = ("SIGTERM received", "PC: @")  # Ray's native failure-signal handler's stack dump


def one_line(r_code: int, stderr: str, code: int, *needles: str) -> str:
    """Exit ``code``; the error is one line (the last), every other line the project's own progress."""
    lines = stderr.strip().splitlines()
    assert r_code == code, stderr[-3000:]
    errors = [line for line in lines if not line.startswith("[")]
    assert len(errors) == 1 and lines[-1] == errors[0] and errors[0].startswith("error: "), stderr[-3000:]
    for n in needles:
        assert n in errors[0], errors[0]
    return errors[0]


@contextmanager
def small_fs(path: Path, kib: int):
    """A tmpfs of ``kib`` KiB at ``path`` (unmounted afterwards); skip where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(path)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a size-limited tmpfs here (needs root): {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def resize(path: Path, kib: int, *opts: str) -> None:
    subprocess.run(["mount", "-o", ",".join(["remount", f"size={kib}k", *opts]), str(path)], check=True)


def leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if TEMP_MARK in p.name or p.name.endswith(".partial")]


# ---- the error itself: from atomic_file, and through Ray's wrappers ------------------------------------------
@pytest.mark.parametrize("code,words", [(errno.ENOSPC, "no space left on device"),
                                        (errno.EDQUOT, "disk quota exceeded"),
                                        (errno.EROFS, "read-only filesystem")])
def test_atomic_file_turns_a_full_disk_into_one_line_and_removes_its_temporary(tmp_path, code, words):
    """Injected where a filesystem cannot be limited: the OSError a write raises inside ``atomic_file``."""
    path = tmp_path / "shard-000003.tar"
    with pytest.raises(DiskFull) as e:
        with atomic_file(path) as tmp:
            tmp.write_bytes(b"half a shard")
            raise OSError(code, os.strerror(code), str(tmp))
    assert str(e.value).startswith(f"{path}: {words}") and "\n" not in str(e.value)
    assert not path.exists() and not list(tmp_path.iterdir())


def test_a_real_full_and_read_only_filesystem(tmp_path):
    with small_fs(tmp_path / "fs", 256) as fs:
        with pytest.raises(DiskFull, match=rf"^{fs / 'big.bin'}: no space left on device \(.* free there\)$"):
            atomic_write_bytes(fs / "big.bin", os.urandom(512 * 1024))
        assert not list(fs.iterdir())  # neither the file nor its temporary
        atomic_write_bytes(fs / "small.json", b"{}")
        resize(fs, 256, "ro")
        with pytest.raises(DiskFull, match=rf"^{fs / 'other.json'}: read-only filesystem$"):
            atomic_write_bytes(fs / "other.json", b"{}")
        assert [p.name for p in fs.iterdir()] == ["small.json"]


def test_a_streamed_torch_save_writes_what_torch_saves_and_a_full_disk_leaves_nothing(tmp_path):
    """``atomic_torch_save`` (the purifier's checkpoints and purifier.pt): the bytes torch.save writes into memory,
    the size and sha256 of the file as written, no temporary left; on a full filesystem one DiskFull line and
    neither the file nor its temporary."""
    import io

    import torch

    from pipeline.store import atomic_torch_save, sha256_file

    obj = {"model": {"w": torch.arange(100_000, dtype=torch.float32)}, "epoch": 3, "history": [{"loss": 1.5}]}
    buf = io.BytesIO()
    torch.save(obj, buf)
    rec = atomic_torch_save(tmp_path / "epoch-0003.pt", obj)
    assert (tmp_path / "epoch-0003.pt").read_bytes() == buf.getvalue()
    assert rec == {"bytes": len(buf.getvalue()), "sha256": sha256_file(tmp_path / "epoch-0003.pt")}
    assert [p.name for p in tmp_path.iterdir()] == ["epoch-0003.pt"]
    with small_fs(tmp_path / "fs", 256) as fs:
        with pytest.raises(DiskFull, match=rf"^{fs / 'purifier.pt'}: no space left on device \(.* free there\)$"):
            atomic_torch_save(fs / "purifier.pt", obj)  # 400 KB into 256 KiB
        assert not list(fs.iterdir())


def _enospc(name="/s/fmnist/attacks/k/.shard-000001.tar.tmp-123-abcd1234"):
    return OSError(errno.ENOSPC, "No space left on device", name)


def test_a_full_disk_is_found_through_every_ray_wrapper():
    """A bare OSError of a full disk (not from atomic_file: zarr's writes, a library's) anywhere in a chain: a Ray
    task's RayTaskError (and the dual class ray.get raises), Ray Data's UserCodeException, Ray Train's
    WorkerGroupError / ControllerError, a later error raised while handling it (a ``finally`` copying logs)."""
    from ray.data.exceptions import UserCodeException
    from ray.exceptions import RayTaskError
    from ray.train.v2.api.exceptions import ControllerError, WorkerGroupError

    task = RayTaskError("do_unit", "Traceback ...", _enospc(), proctitle="ray::f", pid=1, ip="127.0.0.1")
    try:
        raise UserCodeException("UDF failed") from _enospc()
    except UserCodeException as exc:
        udf = exc
    try:
        try:
            raise DiskFull("/s/x: no space left on device")
        finally:
            raise shutil.Error([("a", "b", "[Errno 28] No space left on device")])
    except shutil.Error as exc:
        during = exc
    chains = [task, task.as_instanceof_cause(), udf, WorkerGroupError("rank 0 failed", {0: _enospc()}),
              ControllerError(task), during]
    for chain in chains:
        err = find_user_error(chain)
        assert isinstance(err, DiskFull), chain
        assert str(err).startswith(("/s/fmnist/attacks/k/shard-000001.tar: no space left on device", "/s/x:")), err
    assert find_user_error(OSError(errno.EACCES, "Permission denied", "/s/x")) is None  # not a full disk: a bug


def test_a_user_error_crosses_a_process_boundary_one_way_as_what_it_was():
    """Pickled (a Ray task's exception) or as JSON (a Ray Data row, a Ray Train worker's file), a user error comes
    back as its record made again: its own class, one line, its exit code; a class this process does not know
    comes back as a UserError, never as anything unpickled."""
    from pipeline.config import ConfigError
    from pipeline.errors import NotEnoughSpace
    from pipeline.store import StoreError

    errors = [DiskFull("/s/x: no space left on device (1.0 MB free there)"), StoreError("/s/shard-000001.tar: "
              "content altered"), ConfigError("a.yaml", "attack.eps", "must be > 0"), NotEnoughSpace("--store /s")]
    for err in errors:
        rec = err.record()
        for back in (pickle.loads(pickle.dumps(err)), UserError.from_record(json.loads(json.dumps(rec)))):
            assert type(back) is type(err) and str(back) == str(err) and back.exit_code == err.exit_code
    assert [e.exit_code for e in errors] == [1, 1, 2, 2]
    stranger = UserError.from_record({"class": "os.system", "message": "m", "exit_code": 1})
    assert type(stranger) is UserError and str(stranger) == "m"


def test_a_full_disk_in_a_ray_train_worker_reaches_the_driver_as_a_full_disk(tmp_path):
    """The purifier's workers write a user error to a JSON file for the driver (stages/purifier.py): a full disk
    there is raised again as DiskFull, so the console adds what the stage still needs, as for every other stage."""
    from stages.purifier import WORKER_ERROR, _raise_worker_error, _record_worker_error

    _record_worker_error(tmp_path, DiskFull("/s/fmnist/purifier/k/checkpoints/epoch-0002.pt: no space left on device"))
    assert json.loads((tmp_path / WORKER_ERROR).read_text())["class"] == "DiskFull"
    with pytest.raises(DiskFull, match=r"^/s/fmnist/purifier/k/checkpoints/epoch-0002.pt: no space left on device$"):
        _raise_worker_error(tmp_path)
    assert not (tmp_path / WORKER_ERROR).exists()


def test_a_unit_worker_reports_a_full_disk_as_a_row_the_driver_raises_again():
    from stages._pool import UnitWorker

    class Full(UnitWorker):
        def do_unit(self, unit):
            raise _enospc(f"/s/fmnist/activations/k/acts.zarr/conv1/c/3/0/0/0.{'ab' * 16}.partial")

    row = Full()({"unit": np.array(["shard-000003"]), "items": np.array([8])})
    err = UserError.from_record(json.loads(row["error"][0]))
    # named by the chunk zarr was writing, not by its temporary
    assert str(err).startswith("/s/fmnist/activations/k/acts.zarr/conv1/c/3/0/0/0: no space left on device")
    assert type(err) is DiskFull and err.exit_code == 1 and row["items"][0] == 0


# ---- through the CLI ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(trained_classifier):
    return trained_classifier[0]


@pytest.mark.slow
def test_a_store_too_small_for_the_plan_stops_before_any_work(tmp_path, data):
    with small_fs(tmp_path / "store", 1024) as store:
        r = cli_here("run", "--stage", "attacks", *cli_args(store, data, sets=SMALL))  # fails if it starts Ray
        one_line(r.returncode, r.stderr, 2, f"--store {store}: ", " free, the stages about to run write about ",
                 "classifier 1.", "attacks 1.", "--no-space-check")
        assert "[ray]" not in r.stderr and not any(store.iterdir())  # no Ray, no folder, no lock
        p = cli_here("plan", *cli_args(store, data, sets=SMALL))
        assert p.returncode == 0, p.stderr
        (line,) = [x for x in p.stdout.splitlines() if x.startswith("free space under")]
        assert f"free space under {store}: 1.0 MB" in line and "too little" in line and "--no-space-check" in line


@pytest.fixture(scope="module")
def trained(trained_classifier):
    """The classifier, trained once per test run through the CLI; tests copy its output into their own stores."""
    return trained_classifier[1] / "fmnist" / "classifier"


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@pytest.mark.slow
def test_a_full_disk_mid_stage_is_one_line_and_leaves_only_whole_units(tmp_path, data, trained):
    """The classifier fits, about half of the attack shards do (so the preflight would refuse: above): with the
    override the stage fails on the full disk (exit 1) naming the shard, leaves whole shards with receipts, no
    temporary and no manifest. That is the state a rerun resumes from, through the receipts every interrupted
    stage resumes from (tests/test_precompute.py: test_an_interrupted_stage_resumes_to_identical_output)."""
    kib = (_du(trained) + 4 * 4096) // 1024 + 900  # the classifier, a few metadata pages, ~4 of the 8 shards
    with small_fs(tmp_path / "store", kib) as store:
        shutil.copytree(trained, store / "fmnist" / "classifier")
        args = ["run", "--stage", "attacks", *cli_args(store, data, sets=SMALL)]
        r = cli(*args, "--no-space-check")
        err = one_line(r.returncode, r.stderr, 1, "/fmnist/attacks/", ": no space left on device (",
                       "free there); attacks still needs about ", "(estimate)", "of its unit(s) finished and kept",
                       "run the same command again to resume")
        assert "Traceback" not in r.stderr and "UserCodeException" not in r.stderr
        (out,) = store.glob("fmnist/attacks/*")
        assert not (out / "manifest.json").exists() and not leftovers(store)
        receipts = [json.loads(p.read_text()) for p in sorted((out / "_units").glob("*.json"))]
        assert 1 <= len(receipts) < 8, err
        for rec in receipts:  # what a later run takes as finished is whole
            for f in rec["files"]:
                assert (out / f["name"]).stat().st_size == f["bytes"] and sha256_file(out / f["name"]) == f["sha256"]


def _tagged(token: str) -> list[str]:
    """Processes of the run: every process that inherited the run's environment (the CLI, raylet, workers)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if f"FAULTS_RUN={token}".encode() in Path(f"/proc/{pid}/environ").read_bytes():
                found.append(f"{pid} {Path(f'/proc/{pid}/cmdline').read_bytes()[:80]!r}")
        except OSError:
            pass
    return found


def _sigterm_mid_stage(store: Path, data: Path, err: Path):
    """Start the attacks stage, wait for its first unit's receipt, send SIGTERM to the driver's process group;
    return the exit code, the console and the processes left 5 s later."""
    token = secrets.token_hex(8)
    with open(err, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", "--stage", "attacks",
                                 *cli_args(store, data, sets=SLOW)], cwd=REPO, stdout=subprocess.DEVNULL, stderr=f,
                                text=True, start_new_session=True, env={**os.environ, "FAULTS_RUN": token})
    try:
        while proc.poll() is None and not list(store.glob("fmnist/attacks/*/_units/*.json")):
            time.sleep(0.05)  # an event, not a deadline
        assert proc.poll() is None, "the stage ended before SIGTERM: " + err.read_text()[-3000:]
        os.killpg(proc.pid, signal.SIGTERM)
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    deadline = time.monotonic() + 5  # "a few seconds later"
    while (left := _tagged(token)) and time.monotonic() < deadline:
        time.sleep(0.2)
    for entry in left:  # never leave them to the next test
        try:
            os.kill(int(entry.split()[0]), signal.SIGKILL)
        except ProcessLookupError:
            pass
    return code, err.read_text(), left


@pytest.mark.slow
def test_sigterm_to_the_process_group_mid_stage_exits_143_in_one_line_leaving_no_process(tmp_path, data, trained):
    """SIGTERM to the driver's whole process group, as `timeout`, a shell's job control, a batch scheduler and
    `ray job stop` send it. A local Ray instance runs outside that group (tests/test_precompute.py checks it), so
    the group's signal reaches the driver alone, the same signal as a `kill` of the driver's pid; SIGTERM to a
    driver joined to a cluster is tests/test_cluster.py's. Exit 143, one line saying what was kept, no process of
    the run left, only whole units with receipts and no manifest: the state the same command resumes from
    (tests/test_precompute.py resumes an attacks output killed between a shard and its receipt, byte for byte)."""
    store = tmp_path / "s"
    shutil.copytree(trained, store / "fmnist" / "classifier")
    code, stderr, left = _sigterm_mid_stage(store, data, tmp_path / "err.txt")
    one_line(code, stderr, 143, "terminated (SIGTERM); attacks: ", "unit(s) finished and kept (classifier "
             "complete)", "run the same command again to resume")
    assert not [line for line in stderr.splitlines() if any(d in line for d in DUMP)], stderr
    assert "Traceback" not in stderr and not left, left
    (out,) = store.glob("fmnist/attacks/*")
    assert not (out / "manifest.json").exists() and not leftovers(out)
    receipts = [json.loads(p.read_text()) for p in sorted((out / "_units").glob("*.json"))]
    assert 1 <= len(receipts) < 16
    for rec in receipts:  # what the rerun takes as finished is whole
        for f in rec["files"]:
            assert (out / f["name"]).stat().st_size == f["bytes"] and sha256_file(out / f["name"]) == f["sha256"]


# A driver whose ray.get raised a lost worker (Ray's own exception class) and whose SIGTERM lands a moment later,
# as a group SIGTERM can on a busy machine: the signal is sent from a thread half a second after the loss. A real
# signal to a real process, so a process of its own.
_LOSS_THEN_SIGTERM = """
import os, signal, threading
from ray.exceptions import ActorDiedError
from pipeline import cli
cli._catch_sigterm()
def stage():
    threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM)).start()
    raise ActorDiedError()
cli._dispatch(stage)
"""


def test_a_lost_worker_before_the_drivers_own_sigterm_still_exits_143():
    """The race behind a group SIGTERM's exit 1: Ray's worker died of the signal and the driver saw the loss first.
    A loss to Ray waits (up to ``SIGTERM_GRACE_S``) for a SIGTERM on its way."""
    r = subprocess.run([sys.executable, "-c", _LOSS_THEN_SIGTERM], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    one_line(r.returncode, r.stderr, 143, "terminated (SIGTERM)", "run the same command again to resume")


def test_a_lost_worker_with_no_sigterm_after_it_is_the_bug_it_was():
    """With no SIGTERM within the grace period, the loss is raised as itself (a traceback, exit 1), in this
    process: no signal is involved."""
    from ray.exceptions import ActorDiedError

    from pipeline import cli

    def stage():
        raise ActorDiedError()

    with pytest.raises(ActorDiedError):
        cli._dispatch(stage)


def test_ray_killing_workers_for_memory_is_one_line_naming_the_use_and_what_to_change(capsys):
    """Ray Train's failure as the WRN's purifier met it (Ray's own classes, Ray's message): one line, exit 1."""
    from ray.exceptions import OutOfMemoryError
    from ray.train import ControllerError

    from pipeline import cli

    def stage():
        raise ControllerError(OutOfMemoryError(
            "4 worker(s) were killed due to the node running low on memory. Memory on the node (IP: 10.0.0.1, ID: ab) "
            "was 22.43GB used / 23.54GB limit (0.952993)"))

    with pytest.raises(SystemExit) as e:
        cli._dispatch(stage)
    one_line(e.value.code, capsys.readouterr().err, 1, "out of memory: Ray stopped its worker(s)",
             "(22.43GB used / 23.54GB limit)", "purifier.workers", "run the same command again to resume")
