"""Heterogeneous fleets on a real multi-node Ray cluster (ray.cluster_utils.Cluster, own process)."""
import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).with_name("cluster_sweep.py")


def run_cluster(tmp_path, *extra):
    env = dict(os.environ)
    p = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "t.csv"), *extra], capture_output=True,
                       text=True, timeout=400, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_heterogeneous_cluster_pins_cards_and_survives_node_loss(tmp_path):
    """Nodes labelled T4 and A100 (two A100 nodes): each simulated card type's one actor lands on a node
    of its type; the A100 actor's node is removed mid-sweep, the actor replaced on the other A100 node
    and its work re-queued; every (type x workload) ends ok exactly once, with the counts asked for."""
    out = run_cluster(tmp_path, "--remove-node-after-rows", "2")
    nodes = out["nodes"]
    for p in out["placed"]:
        expected = {nodes["T4"]} if p["card"] == "T4" else {nodes["A100"], nodes["spare"]}
        assert p["node"] in expected, p
    assert out["removed"], "the node was never removed"
    assert out["restarts"] >= 1
    rows = out["rows"]
    keys = [(r["card"], r["model"], r["imgsz"]) for r in rows]
    assert len(keys) == len(set(keys)) == 2 * 4
    assert all(r["status"] == "ok" for r in rows), rows
    assert {(r["card"], r["gpu_count"]) for r in rows} == {("T4", 2), ("A100-80GB", 2)}
