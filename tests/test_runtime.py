"""jobs/runtime.py without Ray: local paths against the cluster's nodes (a node list as ray.nodes() gives it)."""

import pytest

from jobs.runtime import check_paths_reach_every_node


def nodes(alive: int, dead: int = 0) -> list[dict]:
    """A resource view as ray.nodes() reports it."""
    return [{"NodeID": f"{i:02x}" * 28, "Alive": i < alive, "Resources": {"CPU": 4.0}}
            for i in range(alive + dead)]


def test_local_paths_are_refused_on_two_nodes_naming_each_and_the_fix():
    paths = {"archive": ["/data/a.png", "/data/b.png"], "model": ["s3://models/m"], "output": ["/out"]}
    with pytest.raises(ValueError) as e:
        check_paths_reach_every_node(paths, nodes=nodes(2))
    message = str(e.value)
    assert "has 2 nodes" in message and "archive /data/a.png and 1 more" in message and "output /out" in message
    assert "Use s3:// URIs" in message and "--shared-fs" in message and "s3://models/m" not in message


@pytest.mark.parametrize("view", [nodes(1), nodes(1, dead=2)])
def test_local_paths_are_fine_on_one_live_node(view):
    check_paths_reach_every_node({"archive": ["/data/a.png"], "output": ["/out"]}, nodes=view)


def test_object_storage_paths_are_fine_on_any_cluster():
    check_paths_reach_every_node({"archive": ["s3://archive/a.png"], "model": ["s3://models/m"]}, nodes=nodes(8))
