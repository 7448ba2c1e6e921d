"""The cluster path docs/cluster.md documents, for real: a Ray head started with `ray start --head` (free ports, its
own temp dir), the README's `ray job submit ... --working-dir . -- pipeline run ... --ray-address auto` for a
small attacks run, and the store checked afterwards; before it, a driver joined with `--ray-address` is sent SIGTERM
mid-stage (exit 143, its actors gone, the cluster up). The head is stopped whatever happens."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import CLF, REPO, cli_here

BIN = Path(sys.executable).parent
# The shared classifier's settings (CLF): the job finds it in the store and runs the attacks only.
SETS = [*CLF, "attack.shard_size=32", "attack.batch_size=32", "attack.pgd_steps=2", "activations.chunk_rows=32"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dashboard_up(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/version", timeout=2) as r:
            return r.status == 200
    except urllib.error.HTTPError:
        return True  # it answers (e.g. 401 where token authentication is on): the job server is up
    except OSError:
        return False


def _alive_actors(dash: int) -> list[str]:
    """The class names of the cluster's live actors that run a stage's units (Ray Data's map workers; Ray Data's
    own detached bookkeeping actors outlive every job by design), as `ray list actors` reads them: Ray's state
    API over the head's HTTP port, asked from this process (the CLI would start an interpreter per poll)."""
    from ray.util.state import list_actors

    actors = list_actors(address=f"http://127.0.0.1:{dash}", filters=[("state", "=", "ALIVE")], limit=10_000,
                         timeout=60, raise_on_missing_output=False)
    return [a.class_name for a in actors if "MapWorker" in a.class_name or "MapBatches" in a.class_name]


def _sigterm_a_driver_on_the_cluster(tmp_path: Path, data: Path, shared: Path, address: str, dash: int, env: dict):
    """SIGTERM to a driver joined to the cluster (`--ray-address`), in the middle of the attacks: one line, exit
    143, its actors gone within seconds, the head still up (the job submitted next runs on it)."""
    store = tmp_path / "terminated"
    shutil.copytree(shared, store)
    slow = [*CLF, "attack.shard_size=4", "attack.batch_size=4", "attack.pgd_steps=40", "activations.chunk_rows=20"]
    sets = [a for s in [f"data.data_dir={data}", *slow] for a in ("--set", s)]
    with open(tmp_path / "terminated.txt", "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", "--config", "configs/fmnist.yaml",
                                 "--stage", "attacks", "--ray-address", address, "--store", str(store), *sets],
                                cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    try:
        while proc.poll() is None and not list(store.glob("fmnist/attacks/*/_units/*.json")):
            time.sleep(0.05)  # an event: the first finished unit
        assert proc.poll() is None, (tmp_path / "terminated.txt").read_text()[-3000:]
        assert _alive_actors(dash), "the driver's actors should be running on the cluster"
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    stderr = (tmp_path / "terminated.txt").read_text()
    lines = [line for line in stderr.strip().splitlines() if not line.startswith("[")]
    assert code == 143 and len(lines) == 1 and lines[0].startswith("error: terminated (SIGTERM); attacks: "), stderr
    assert "run the same command again to resume" in lines[0] and "Traceback" not in stderr
    deadline = time.monotonic() + 10  # "a few seconds later"
    while (alive := _alive_actors(dash)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not alive, alive  # its tasks and actors cancelled
    assert _dashboard_up(dash)  # the cluster stays


@pytest.mark.slow
def test_ray_job_submit_runs_the_readme_command_on_a_started_head(tmp_path, trained_classifier):
    data, shared = trained_classifier
    store = tmp_path / "store"
    shutil.copytree(shared, store)
    # Short: Ray's socket paths live under the temp dir and must stay below the 107-byte limit.
    ray_tmp = tempfile.mkdtemp(prefix="rh", dir="/tmp")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "disabled"}  # a private head on loopback: no token banner, no token to pass
    env.pop("RAY_ADDRESS", None)
    dash, gcs = free_port(), free_port()
    head_log = open(tmp_path / "head.log", "w")
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dash}", "--include-dashboard=true", f"--ray-client-server-port={free_port()}",
         f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
         f"--metrics-export-port={free_port()}", "--num-cpus=2", f"--temp-dir={ray_tmp}", "--disable-usage-stats"],
        stdout=head_log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        while head.poll() is None and not _dashboard_up(dash):  # an event: the job server answers
            time.sleep(0.5)
        assert head.poll() is None, (tmp_path / "head.log").read_text()[-3000:]
        _sigterm_a_driver_on_the_cluster(tmp_path, data, shared, f"127.0.0.1:{gcs}", dash, env)
        sets = [a for s in [f"data.data_dir={data}", *SETS] for a in ("--set", s)]
        r = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{dash}",
                            "--working-dir", ".", "--", "pipeline", "run", "--config", "configs/fmnist.yaml",
                            "--stage", "attacks", "--ray-address", "auto", "--store", str(store), *sets],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        out = r.stdout + r.stderr
        assert r.returncode == 0 and "succeeded" in out, out[-4000:]
        assert "[ray] Ray cluster at auto" in out  # the job joined the started head, not a local instance
        assert "[classifier] cache hit" in out
        (attacks,) = store.glob("fmnist/attacks/*/manifest.json")
        manifest = json.loads(attacks.read_text())
        assert manifest["counts"]["examples"] == 64 and manifest["counts"]["shards"] == 2
        v = cli_here("verify", "--store", str(store))
        assert v.returncode == 0, v.stdout + v.stderr
    finally:
        if head.poll() is None:
            os.killpg(head.pid, signal.SIGTERM)  # `ray start --block` stops its Ray processes on SIGTERM
            try:
                head.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(head.pid, signal.SIGKILL)
                head.wait()
        head_log.close()
        left = subprocess.run(["pgrep", "-f", ray_tmp], capture_output=True, text=True).stdout.split()
        for pid in left:  # anything of this head that outlived it
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(ray_tmp, ignore_errors=True)
