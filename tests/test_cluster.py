"""The cluster path docs/cluster.md documents, for real: a Ray head started with `ray start --head` (free ports, its
own temp dir), the README's `ray job submit ... --working-dir . -- pipeline run ... --ray-address auto` for a
small attacks run, and the store checked afterwards. The head is stopped whatever happens."""
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

from tests.conftest import CLF, REPO

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
    dash = free_port()
    head_log = open(tmp_path / "head.log", "w")
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={free_port()}", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dash}", "--include-dashboard=true", f"--ray-client-server-port={free_port()}",
         f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
         f"--metrics-export-port={free_port()}", "--num-cpus=2", f"--temp-dir={ray_tmp}", "--disable-usage-stats"],
        stdout=head_log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        while head.poll() is None and not _dashboard_up(dash):  # an event: the job server answers
            time.sleep(0.5)
        assert head.poll() is None, (tmp_path / "head.log").read_text()[-3000:]
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
        v = subprocess.run([sys.executable, "-m", "pipeline.cli", "verify", "--store", str(store)], cwd=REPO,
                           capture_output=True, text=True)
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
