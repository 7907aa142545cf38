"""The nightly audit on a cluster of two Ray nodes on this machine, laid out as cluster/ deploys it: a head
that runs the driver and reads (`ray start --head`, no GPU) and a node that declares one GPU (`ray start
--address ... --num-gpus 1`), where the scoring actors must go with num_gpus=1. On a machine without a
GPU the actors get Ray's GPU id and run on the CPU: device `auto` is the CPU where torch sees no GPU.

The audit goes through `ray job submit` against a real S3 server (tests/s3server.py); where everything
ran is read back through Ray's state API (ray.util.state), the rows with DuckDB. Each node has its own
ports and temp dir, so the test runs beside other Ray clusters on the machine."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from anomaly_core import storage
from anomaly_core.config import ModelConfig
from anomaly_core.images import decode_image, resize_square
from anomaly_core.model import Model
from anomaly_core.storage import StorageOptions
from jobs.analyst import connect
from tests.helpers import TEST_CONFIG_KW, make_bucket, png_bytes, wait_for_dashboard
from tests.s3server import MotoServer, free_port

# starts a Ray head, GPU nodes and an S3 server, and submits jobs
pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# Ray Data's names: the actors of the score job's model stage, and the tasks that fetch and decode images
SCORER_ACTOR = "MapWorker(MapBatches(Scorer))"
READ_TASK = "MapBatches(read_batch)"
# the ports a Ray node binds besides the head's GCS and dashboard (each node here needs its own)
NODE_PORTS = ("node-manager-port", "object-manager-port", "dashboard-agent-listen-port",
              "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port")
# where device `auto` puts an actor that Ray gave a GPU: CUDA where torch sees one, else the CPU
AUTO_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


class Cluster:
    """A Ray head (2 CPUs, no GPU) and nodes that declare one GPU and one CPU, each a `ray start --block`
    process group of its own, with its own ports and temp dir under `root`."""

    def __init__(self, root: Path):
        self.root = root
        # token auth (Ray's default): `ray start` writes ~/.ray/auth_token, which `ray job submit` and the
        # state API read. RAY_LOGGING_CONFIG_ENCODING: the job's workers log our INFO lines to their log
        # files, where the state API's get_log reads the scorer's device line.
        self.env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        self.env.update(RAY_AUTH_MODE="token", RAY_LOGGING_CONFIG_ENCODING="TEXT",
                        PATH=f"{BIN}{os.pathsep}{self.env['PATH']}")   # `python` = this venv's
        self.gcs, dash = free_port(), free_port()
        self.url = f"http://127.0.0.1:{dash}"
        self.gpu_nodes: dict[str, subprocess.Popen] = {}
        self.head = self._start("head", "--head", f"--port={self.gcs}", "--num-cpus=2", "--num-gpus=0",
                                "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                                f"--ray-client-server-port={free_port()}")
        try:
            wait_for_dashboard(self.url, self.head)
        except RuntimeError as e:
            _kill_group(self.head)
            raise RuntimeError(f"{e}:\n{self.log('head')[-3000:]}") from None

    def _start(self, name: str, *args: str) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "wb")
        return subprocess.Popen([str(BIN / "ray"), "start", "--block", *args, "--object-store-memory=100000000",
                                 "--disable-usage-stats", f"--temp-dir={self.root / name}",
                                 *(f"--{p}={free_port()}" for p in NODE_PORTS)],
                                env=self.env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)

    def add_gpu_node(self, name: str) -> None:
        """Start a node declaring one GPU; returns once it has joined (`ray start` waits for the head to
        register it, then says so). `ray start` gives a raylet 30 s to register, which a loaded machine can
        exceed: a node that fails to start is killed and started once more, on new ports."""
        for attempt in (name, f"{name}-again"):
            proc = self._start(attempt, f"--address=127.0.0.1:{self.gcs}", "--num-cpus=1", "--num-gpus=1")
            deadline = time.time() + 120
            while "Ray runtime started." not in (log := self.log(attempt)) and proc.poll() is None \
                    and time.time() < deadline:
                time.sleep(0.5)
            if "Ray runtime started." in log:
                self.gpu_nodes[name] = proc
                return
            _kill_group(proc)
        raise RuntimeError(f"GPU node {name} did not join twice (exit {proc.poll()}):\n{log[-3000:]}")

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")

    def kill(self, name: str) -> None:
        """SIGKILL the node's raylet, its agents and its workers at once: a machine lost mid-run."""
        _kill_group(self.gpu_nodes.pop(name))

    def stop(self) -> None:
        """SIGKILL every node: a graceful stop drains each node for up to 30 s, and nothing here needs it."""
        for name in list(self.gpu_nodes):
            self.kill(name)
        _kill_group(self.head)

    def submit(self, submission_id: str, *argv: str) -> subprocess.Popen:
        """`ray job submit` of `python -m jobs ...`, as the README shows it; returns the running client, whose
        output (the job's log, then its status) goes to <root>/<submission_id>.log."""
        return subprocess.Popen([str(BIN / "ray"), "job", "submit", "--address", self.url, "--submission-id",
                                 submission_id, "--working-dir", ".", "--runtime-env", "cluster/runtime_env.yaml",
                                 "--", "python", "-m", "jobs", *argv],
                                cwd=REPO, env=self.env, stdout=open(self.root / f"{submission_id}.log", "w"),
                                stderr=subprocess.STDOUT)

    def job_output(self, submission_id: str) -> str:
        return (self.root / f"{submission_id}.log").read_text()


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group `proc` leads (a `ray start` and everything it started)."""
    with contextlib.suppress(ProcessLookupError):            # the group is gone already
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(60)


@pytest.fixture(scope="module")
def s3():
    """(endpoint URL, options) of an S3 server of this module's own, with buckets archive/models/audits."""
    server = MotoServer()
    for bucket in ("archive", "models", "audits"):
        make_bucket(server.url, bucket)
    yield server.url, StorageOptions(endpoint_url=server.url)
    server.stop()


@pytest.fixture(scope="module")
def model(s3) -> str:
    """A tiny model (112 px, one block) fitted in this process on 8 generated parts, saved to S3."""
    config = ModelConfig(**TEST_CONFIG_KW)
    pixels = np.stack([resize_square(decode_image(png_bytes(part(i))), config.input_size) for i in range(8)])
    Model.fit(pixels, config=config, device="cpu").save("s3://models/plate", options=s3[1])
    return "s3://models/plate"


@pytest.fixture(scope="module")
def cluster():
    root = Path(tempfile.mkdtemp(prefix="ray2n-"))       # short: Ray's socket paths live under it
    c = Cluster(root)
    try:
        c.add_gpu_node("gpu-a")
        yield c
    finally:
        c.stop()
        shutil.rmtree(root, ignore_errors=True)


def part(i: int) -> np.ndarray:
    """A 56 x 56 RGB 'part': one coarse pattern for all, pixel noise of its own (seeded by i)."""
    pattern = np.random.default_rng(0).integers(0, 256, (8, 8, 3))
    noise = np.random.default_rng(i + 1).integers(-20, 21, (56, 56, 3))
    return np.clip(np.kron(pattern, np.ones((7, 7, 1))) + noise, 0, 255).astype(np.uint8)


def upload_night(prefix: str, n: int, options: StorageOptions) -> list[str]:
    uris = [f"{prefix}/{i:04d}.png" for i in range(n)]
    for i, uri in enumerate(uris):
        storage.write_bytes(uri, png_bytes(part(100 + i)), options)
    return uris


def score_args(archive: str, model: str, out: str, endpoint: str) -> list[str]:
    # 8 rows per committed file: a run of N images commits N/8 times, so a node can be lost between commits
    return ["score", archive, model, out, "--endpoint-url", endpoint, "--run-date", "2026-11-21",
            "--batch-size", "4", "--rows-per-file", "8"]


def wait(proc: subprocess.Popen, timeout: float = 300) -> int:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


def summary_of(output: str) -> dict:
    """The job's last line: the run summary."""
    return json.loads(next(line for line in reversed(output.splitlines()) if line.startswith('{"')))


def job_state(cluster: Cluster, submission_id: str) -> dict:
    """Nodes, the job's scoring actors (with the scorer's device line from each one's log) and its tasks,
    from Ray's state API (tests/ray_state.py, in a process with the cluster's environment)."""
    done = subprocess.run([sys.executable, "-m", "tests.ray_state", f"127.0.0.1:{cluster.gcs}", submission_id,
                           SCORER_ACTOR],
                          cwd=REPO, env=cluster.env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def placement(state: dict) -> str:
    """actor -> node -> GPU id, one line per scoring actor, for assertion messages."""
    nodes = {n["node_id"]: f"{n['node_id'][:8]} ({n['state']}, {n['resources_total'].get('GPU', 0):g} GPU)"
             for n in state["nodes"]}
    return "\n".join(f"actor {a['actor_id'][:8]} -> node {nodes.get(a['node_id'], a['node_id'])} -> GPU id "
                     f"{a['gpu_ids']} (reserved {a['required_resources']}, backbone on {a['device']}, "
                     f"restarts {a['num_restarts']})" for a in state["actors"])


def gpu_nodes(state: dict, *, alive: bool = False) -> set[str]:
    return {n["node_id"] for n in state["nodes"]
            if n["resources_total"].get("GPU") and (n["state"] == "ALIVE" or not alive)}


def published(out: str, options: StorageOptions) -> tuple[int, set[str]]:
    """(rows, distinct image URIs) of the published output, read with DuckDB."""
    con = connect(out, options)
    rows = con.execute("SELECT count(*) FROM scores").fetchone()[0]
    return rows, {u for (u,) in con.execute("SELECT DISTINCT uri FROM scores").fetchall()}


def test_scoring_actors_run_on_the_gpu_node_and_reads_outside_them(cluster, s3, model):
    endpoint, opts = s3
    uris = upload_night("s3://archive/plate/2026-11-21", 24, opts)
    job = cluster.submit("placement", *score_args("s3://archive/plate/2026-11-21", model, "s3://audits/plate",
                                                  endpoint))
    assert wait(job) == 0, cluster.job_output("placement")[-3000:]
    state = job_state(cluster, "placement")
    where = placement(state)
    print(f"placement:\n{where}")
    actors, gpus = state["actors"], gpu_nodes(state)
    assert actors and all(a["node_id"] in gpus and a["required_resources"].get("GPU") == 1 for a in actors), where
    # Ray gave each actor GPU 0 of its node; `auto` ran the backbone there, or on the CPU without a GPU
    assert all((a["gpu_ids"], a["device"]) == ("0", AUTO_DEVICE) for a in actors), where
    reads = [t for t in state["tasks"] if t["name"] == READ_TASK]
    scoring = [t for t in state["tasks"] if t["name"] == f"{SCORER_ACTOR}.submit"]
    read_kinds = sorted({(t["type"], t["actor_id"], t["node_id"][:8], str(t["required_resources"])) for t in reads})
    assert reads and all(t["type"] == "NORMAL_TASK" and t["actor_id"] is None
                         and not t["required_resources"].get("GPU") for t in reads), (
        f"read tasks (type, actor, node, resources): {read_kinds}\n{where}")
    assert scoring and all(t["node_id"] in gpus for t in scoring), where
    assert published("s3://audits/plate", opts) == (len(uris), set(uris))
    assert summary_of(cluster.job_output("placement"))["images"] == len(uris)


def test_losing_the_gpu_node_mid_run_loses_and_duplicates_nothing(cluster, s3, model):
    """The GPU node is killed once the run's first file is committed, and a new one joins: Ray restarts
    the scoring actor there and re-runs what the dead node held. One submission completes the audit,
    every image exactly once."""
    endpoint, opts = s3
    n, files = 96, 96 // 8
    uris = upload_night("s3://archive/plate/2026-11-22", n, opts)
    job = cluster.submit("node-loss", *score_args("s3://archive/plate/2026-11-22", model, "s3://audits/loss",
                                                  endpoint))
    deadline = time.time() + 300
    while not (staged := storage.list_files("s3://audits/loss/_staging", opts, suffixes=(".parquet",),
                                            skip_hidden=False)):
        assert job.poll() is None and time.time() < deadline, cluster.job_output("node-loss")[-3000:]
        time.sleep(0.2)
    [lost] = list(cluster.gpu_nodes)
    cluster.kill(lost)
    cluster.add_gpu_node("gpu-b")
    assert wait(job) == 0, cluster.job_output("node-loss")[-3000:]
    state = job_state(cluster, "node-loss")
    where = placement(state)
    print(f"GPU node killed with {len(staged)} of {files} files committed; placement:\n{where}")
    assert len(staged) < files, "the node was killed after the run had committed everything"
    lost_tasks = [t for t in state["tasks"] if t["name"] == f"{SCORER_ACTOR}.submit" and t["state"] == "FAILED"]
    assert lost_tasks, f"no scoring task was lost with the node\n{where}"
    [actor] = state["actors"]
    assert actor["node_id"] in gpu_nodes(state, alive=True) and actor["num_restarts"] >= 1, where
    assert (actor["gpu_ids"], actor["device"]) == ("0", AUTO_DEVICE), where
    rows, distinct = published("s3://audits/loss", opts)
    assert (rows, distinct) == (n, set(uris)), f"{rows} rows, {len(distinct)} distinct URIs for {n} images"
    summary = summary_of(cluster.job_output("node-loss"))
    assert (summary["images"], summary["duplicates"], summary["errors"]) == (n, 0, 0)
