"""Run a simulated sweep on a multi-node ray.cluster_utils.Cluster; print what ran where as JSON.

A script, not a test: it needs its own Ray (the test session shares another), so
tests/test_cluster.py runs it in a subprocess.
    python tests/cluster_sweep.py OUT.csv [--remove-node-after-rows N]
"""
import json
import sys
import threading
import time

import ray
from ray.cluster_utils import Cluster

from orchestrator import cluster, job, sweeploop, table


def main(out: str, remove_after: int | None) -> None:
    ray_cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0})
    t4 = ray_cluster.add_node(num_cpus=1, num_gpus=2, resources={"accelerator_type:T4": 1},
                          labels={"ray.io/accelerator-type": "T4"})
    a100 = ray_cluster.add_node(num_cpus=1, num_gpus=1, resources={"accelerator_type:A100-80G": 1},
                            labels={"ray.io/accelerator-type": "A100"})
    spare = ray_cluster.add_node(num_cpus=1, num_gpus=1, resources={"accelerator_type:A100-80G": 1},
                             labels={"ray.io/accelerator-type": "A100"}) if remove_after else None
    ray.init(address=ray_cluster.address, log_to_driver=False, logging_level="error")
    fleet_spec = "T4 x2, A100-80GB x2" if remove_after else "T4 x2, A100-80GB"
    j = job.from_dict({"sweep": {"models": ["tiny_models:tiny", "tiny_models:tiny_slow"], "imgsz": [64, 96],
                                 "out": out},
                       "fleet": {"mode": "simulate", "simulate": fleet_spec, "actor_timeout_s": 60}}, "cluster")
    sweep = sweeploop.Sweep(j)
    sweep.start(cluster.resolve_devices(j.fleet)[0])
    removed = []
    placed = [{"card": info.card, "node": info.node} for info in sweep.devices()]
    if remove_after:
        # the A100 type's one actor is on one of the two A100 nodes: that node is lost
        doomed = next(n for n in (a100, spare) if n.node_id in {p["node"] for p in placed if p["card"] != "T4"})

        def remover():
            while len(table.read(out)) < remove_after:
                time.sleep(0.1)
            ray_cluster.remove_node(doomed)  # a whole node lost mid-sweep, its actor with it
            removed.append(doomed.node_id)

        threading.Thread(target=remover, daemon=True).start()
    stats = sweep.run()
    sweep.shutdown()
    df = table.read(out)
    print(json.dumps({
        "placed": placed,
        "nodes": {"T4": t4.node_id, "A100": a100.node_id, "spare": spare.node_id if spare else None},
        "removed": removed,
        "rows": df[["card", "model", "imgsz", "status", "batch_size", "gpu_count", "attempts", "error"]]
        .to_dict("records"),
        "restarts": stats.actor_restarts,
    }, default=str))
    ray.shutdown()
    ray_cluster.shutdown()


if __name__ == "__main__":
    n = int(sys.argv[3]) if len(sys.argv) > 3 and sys.argv[2] == "--remove-node-after-rows" else None
    main(sys.argv[1], n)
