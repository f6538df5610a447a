"""One way to reach Ray for every front door: join a cluster, or start the embedded local one."""

from __future__ import annotations

import logging
import os


def connect_ray(address: str | None) -> bool:
    """Connect to a cluster, or start the embedded local Ray; True when this call started Ray.

    Without an address (argument or RAY_ADDRESS) a private local Ray starts (`address="local"`: never
    attach to another process's Ray by accident), with more logical CPUs than cores so an actor never
    starves the decode/write tasks on a small machine.

    Worker logs reach the driver (`log_to_driver=True`): an actor's traceback or warning is printed on
    the driver's stderr as a log line, in the `--log-level`/`--log-format` the CLI was given
    (`capray.logs.ray_logging_config`), instead of staying in a file under /tmp/ray/session_*/logs on
    whichever node ran it. (They are still in those files, and in the RayJob's logs.) `ray.init` also
    installs Ray's handler on the driver's root logger; the driver keeps capray's own instead.
    """
    import ray

    from capray.logs import ray_logging_config

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    common = {"log_to_driver": True, "logging_config": ray_logging_config()}
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        if address:
            ray.init(address=address, **common)
        else:
            ray.init(address="local", num_cpus=max(4, os.cpu_count() or 1), object_store_memory=1024**3,
                     include_dashboard=False, **common)
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    return True


# Ray's own head-node resource: its train state actor pins itself to the head the same way.
ON_HEAD_NODE = {"resources": {"node:__internal_head__": 0.001}}
"""Options for the job's small bookkeeping actors (tally, attempt ledger): the head node lives as long
as the cluster does, while any worker node (even the one a driver attached to) may be removed."""
