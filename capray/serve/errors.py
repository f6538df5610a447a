"""What a client is told when a job fails: short, stable messages, never internal addresses.

A Ray exception carries node IPs, PIDs and tracebacks; those go to the server log (with the job id),
and the client gets one of the messages below. Input errors the engine raises (`ValueError`) are the
exception: their text is about the request, so the client sees it (first line, bounded); so is a
non-finite value's (`NonFiniteError`), which names the step and what a rerun needs.
"""

from __future__ import annotations

import logging

log = logging.getLogger("capray.serve")

BUSY = "server busy: too many queued requests, retry later"
WORKER_LOST = "the protection worker stopped while running this job; retry (the same request gives the same pixels)"
INTERNAL = "internal error while protecting this job"


def timed_out(seconds: float) -> str:
    return f"timed out after {seconds:g} s (serve.job_timeout_s)"


def not_started(seconds: float) -> str:
    return (f"no protection worker was free to start this job within {seconds:g} s (serve.job_timeout_s); "
            "retry later")


def _cause(exc: BaseException) -> BaseException:
    from ray.exceptions import RayTaskError

    return exc.cause if isinstance(exc, RayTaskError) and getattr(exc, "cause", None) else exc


def is_busy(exc: BaseException) -> bool:
    """A call the Protector handle refused for backpressure (queues full): worth retrying later."""
    from ray.serve.exceptions import BackPressureError

    return isinstance(exc, BackPressureError) or isinstance(_cause(exc), BackPressureError)


def public_error(exc: BaseException, job_id: str | None = None) -> str:
    """The client-facing message for an exception raised while running a job (the detail is logged)."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError, NodeDiedError, RayActorError
    from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError

    if is_busy(exc):
        return BUSY
    cause = _cause(exc)
    from capray.attack.guard import NonFiniteError

    if isinstance(cause, NonFiniteError):  # about the numbers, not the server: the client may act on it
        log.warning("job %s: %s", job_id, cause)
        return str(cause)[:300]
    if isinstance(cause, ValueError):
        first = (str(cause).strip().splitlines() or [""])[0]
        return f"invalid input: {first[:200]}"
    log.warning("job %s failed: %r", job_id, exc, exc_info=exc)
    if isinstance(cause, (ActorDiedError, ActorUnavailableError, RayActorError, NodeDiedError,
                          ReplicaUnavailableError, DeploymentUnavailableError)):
        return WORKER_LOST
    return INTERNAL
