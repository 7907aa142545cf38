"""Where a Ray job's work ran, read through Ray's state API (ray.util.state) as a client of the cluster:

    python -m tests.ray_state GCS_ADDRESS SUBMISSION_ID ACTOR_CLASS    -> one JSON object on stdout

It runs in a process of its own, started with the cluster's environment: Ray reads RAY_AUTH_MODE=token
(which makes the state API send the cluster's token) once, when it is imported, so a test process that
imported Ray without it cannot turn it on. Used by tests/test_two_node.py."""

from __future__ import annotations

import dataclasses
import json
import re
import sys

# the scorer's start-up line (jobs/scorer.py): the device its backbone runs on, the GPU ids Ray assigned it
SCORER_LINE = re.compile(r"scorer: model \S+, backbone on (?P<device>\S+), .*CUDA_VISIBLE_DEVICES=(?P<gpu_ids>\S+)")
TASK_FIELDS = ("name", "type", "state", "actor_id", "node_id", "required_resources")


def job_state(address: str, submission_id: str, *, actor_class: str) -> dict:
    """{"nodes": [{node_id, state, resources_total}], "actors": [{actor_id, node_id, num_restarts,
    required_resources, device, gpu_ids}], "tasks": [{name, type, state, actor_id, node_id,
    required_resources}]} for the job submitted as `submission_id` to the cluster at `address` (host:port
    of its GCS). Actors of class `actor_class` only; device and gpu_ids come from the scorer's start-up line
    in the actor's log (None where its node is gone or the line is absent)."""
    from ray.util.state import get_log, list_actors, list_jobs, list_nodes, list_tasks
    nodes = [{"node_id": n.node_id, "state": n.state, "resources_total": n.resources_total}
             for n in list_nodes(address=address, limit=1000)]
    alive = {n["node_id"] for n in nodes if n["state"] == "ALIVE"}
    job_id = next(j.job_id for j in list_jobs(address=address) if j.submission_id == submission_id)
    actors = []
    for a in list_actors(address=address, detail=True, limit=10_000,
                         filters=[("job_id", "=", job_id), ("class_name", "=", actor_class)]):
        found = None
        if a.node_id in alive:
            found = SCORER_LINE.search("".join(get_log(address=address, actor_id=a.actor_id, suffix="err", tail=-1)))
        actors.append({"actor_id": a.actor_id, "node_id": a.node_id, "num_restarts": a.num_restarts,
                       "required_resources": a.required_resources, "device": found and found["device"],
                       "gpu_ids": found and found["gpu_ids"]})
    tasks = [{k: v for k, v in dataclasses.asdict(t).items() if k in TASK_FIELDS}
             for t in list_tasks(address=address, detail=True, limit=10_000, filters=[("job_id", "=", job_id)])]
    return {"nodes": nodes, "actors": actors, "tasks": tasks}


if __name__ == "__main__":
    address, submission_id, actor_class = sys.argv[1:]
    print(json.dumps(job_state(address, submission_id, actor_class=actor_class)))
