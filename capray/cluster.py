"""One way to reach Ray for every front door: join a cluster, or start the embedded local one."""

from __future__ import annotations

import os


def connect_ray(address: str | None) -> bool:
    """Connect to a cluster, or start the embedded local Ray; True when this call started Ray.

    Without an address (argument or RAY_ADDRESS) a private local Ray starts (`address="local"`: never
    attach to another process's Ray by accident), with more logical CPUs than cores so an actor never
    starves the decode/write tasks on a small machine.
    """
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(address="local", num_cpus=max(4, os.cpu_count() or 1), object_store_memory=1024**3,
                 include_dashboard=False, log_to_driver=False)
    return True


# Ray's own head-node resource: its train state actor pins itself to the head the same way.
ON_HEAD_NODE = {"resources": {"node:__internal_head__": 0.001}}
"""Options for the job's small bookkeeping actors (tally, attempt ledger): the head node lives as long
as the cluster does, while any worker node (even the one a driver attached to) may be removed."""
