"""A Ray cluster of N nodes on this machine (Ray's cluster utilities), for vera-serve --address.

    python bench/ray_cluster.py --nodes 2 --cpus-per-node 1

Prints "address HOST:PORT" once the nodes are up, then keeps the cluster until stdin closes or it is
interrupted; everything it started stops with it.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray's traffic over 127.0.0.1, not the LAN address
# Serve's proxy prefers replicas on its own node; with every node on one machine that would leave the
# others idle. The proxy reads this in its own process, which inherits the nodes' environment: set here.
os.environ.setdefault("RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING", "0")
from ray.cluster_utils import Cluster  # noqa: E402 - after the line above, which Ray reads on import


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--cpus-per-node", type=float, default=1)
    args = parser.parse_args()
    local = {"num_cpus": args.cpus_per_node, "node_ip_address": "127.0.0.1"}  # Ray's traffic stays on loopback
    cluster = Cluster(initialize_head=True, head_node_args={**local, "include_dashboard": False})
    try:
        for _ in range(args.nodes - 1):
            cluster.add_node(**local)
        cluster.wait_for_nodes()
        print(f"address {cluster.address}", flush=True)
        sys.stdin.read()  # until the caller closes stdin or stops us
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    main()
