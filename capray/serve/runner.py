"""Running jobs from the durable store, in whichever ingress replica is alive.

A runner holds a job by a lease it renews (with the progress) while the Protector works; every
replica sweeps the store's pending jobs and takes over one whose lease ran out — its runner was
lost to a restart, a node loss or an upgrade. A rerun is safe because the same request gives the
same pixels; after `serve.job_attempts` runs the job is failed with the reason instead. The same
sweep deletes finished jobs past `serve.job_ttl_s`. Every job ends `ok` or `failed`, with a
client-safe error (`errors.public_error`): at most `serve.job_timeout_s` after the Protector starts
it, and failed if no Protector starts it within `serve.job_timeout_s` (busy refusals are retried).

The lease is the job's status itself (`capray.io.lease`, `JobStore`): created with `If-None-Match`,
renewed with the progress on `If-Match`, judged expired by the store's clock (a replica whose clock
runs fast adopts nothing alive), and taken over by exactly one replica with the next fencing
generation. A runner whose lease was taken over, or could not be renewed for 2/3 of
`serve.job_lease_s`, cancels its Protector call and writes nothing more; a late renewal or a second
runner never rewrites a finished job, nor one another replica now runs.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from capray.config import JOB_SECTIONS, CaprayConfig
from capray.io.lease import Lease, Seen
from capray.serve import errors
from capray.serve.limits import RequestError
from capray.serve.requests import Submission, decode_photos
from capray.serve.results import build_result
from capray.serve.store import JobRequest, JobState, JobStore

# protect(rgbs, cfg, identity, on_progress, fixed rgbs) -> (protected rgbs, ProtectionRecord)
ProtectCall = Callable[[list[Any], CaprayConfig, str, Callable[[int, int], None], list[Any]],
                       Awaitable[tuple[list[Any], Any]]]


BACKOFF_S, MAX_BACKOFF_S = 0.5, 15.0  # retrying a Protector call refused for backpressure


def new_job_id() -> str:
    return uuid.uuid4().hex


class JobTimeout(Exception):
    """The job did not start, or did not finish, within `serve.job_timeout_s` (the message says which)."""


async def _within(call: asyncio.Future, started: list[float], start_by: float, limit: float) -> Any:
    """`call`'s result, or `JobTimeout`: `limit` s after it started (`started[0]`), or at `start_by` if it has not."""
    while True:
        deadline = started[0] + limit if started else start_by
        done, _ = await asyncio.wait({call}, timeout=max(deadline - time.monotonic(), 0.0))
        if done:
            return call.result()
        if started and started[0] + limit > deadline:
            continue  # it started meanwhile: its run gets the full limit
        raise JobTimeout(errors.timed_out(limit) if started else errors.not_started(limit))


class JobRunner:
    def __init__(self, store: JobStore, config: CaprayConfig, protect: ProtectCall, tag: str):
        self.store, self.config, self.protect, self.tag = store, config, protect, tag
        self.limits = config.serve
        self.running: dict[str, asyncio.Task] = {}

    @property
    def heartbeat_s(self) -> float:
        return min(self.limits.job_lease_s / 3, 2.0)

    async def _io(self, fn: Callable, *args: Any) -> Any:
        return await asyncio.to_thread(fn, *args)

    # -- submitting and running -----------------------------------------------------------------
    async def submit(self, sub: Submission, decoded: list[Any], cfg: CaprayConfig, owner: str,
                     held: list[Any] = (), job_id: str | None = None, idempotency_key: str | None = None) -> JobState:
        """Store the job (request and photo files first, the fixed photos after them), then run it here.
        `job_id`: the id an Idempotency-Key record already names; `idempotency_key`: that record's digest."""
        now = time.time()
        request = JobRequest(job_id=job_id or new_job_id(), owner=owner, identity=sub.identity, names=sub.names,
                             fixed_count=len(sub.fixed_files), created_at=now, idempotency_key=idempotency_key,
                             config=cfg.model_dump(mode="json", include=set(JOB_SECTIONS)))
        state = JobState(job_id=request.job_id, owner=owner, created_at=now, updated_at=now, photos=len(sub.files),
                         steps_total=cfg.attack.total_pgd_steps, holder=self.tag, attempts=1)
        claim = await self._io(self.store.create, request, [*sub.files, *sub.fixed_files], state,
                               self.limits.job_lease_s)
        self._spawn(claim, request, (decoded, list(held)))
        return state

    def _spawn(self, claim: Lease, request: JobRequest, decoded: tuple[list[Any], list[Any]] | None) -> None:
        state = JobState.model_validate(claim.body)
        task = asyncio.create_task(self._run(claim, state, request, decoded))
        self.running[state.job_id] = task
        task.add_done_callback(lambda _: self.running.pop(state.job_id, None))

    async def _run(self, claim: Lease, state: JobState, request: JobRequest,
                   decoded: tuple[list[Any], list[Any]] | None) -> None:
        """One run under the job's lease: renewed with the progress every `heartbeat_s` (in the lease's
        thread, so a busy event loop cannot let it lapse); once it is lost the run is cancelled (the
        Protector stops at its next PGD step instead of finishing for no one) and nothing is written."""
        attempt = asyncio.ensure_future(self._attempt(state, request, decoded))
        loop = asyncio.get_running_loop()
        claim.refresh = lambda: {"steps_done": state.steps_done, "steps_total": state.steps_total,
                                 "updated_at": time.time()}
        claim.period_s = self.heartbeat_s
        claim.on_lost = lambda: loop.call_soon_threadsafe(attempt.cancel)
        claim.start()
        try:
            status, detail = await attempt
        except asyncio.CancelledError:
            claim.abandon()  # no more renewals, in either case: the lease runs out and another replica adopts it
            if claim.lost:  # taken over, or not renewable: the job is not this runner's to write
                errors.log.warning("job %s: %s; runner %s stops running it", state.job_id, claim.lost, self.tag)
                return
            raise  # this runner is cancelled (replica stopping): the job stays pending
        if status == "ok":
            files, result = detail
            photos = [(data, photo.format) for data, photo in zip(files, result.photos)]
            wrote = await self._io(self.store.finish, claim, state, photos, result.model_dump_json().encode())
        else:
            wrote = await self._io(self.store.fail, claim, state, detail)
        if not wrote:
            errors.log.warning("job %s: finished or taken over elsewhere; runner %s drops its %s outcome",
                               state.job_id, self.tag, status)

    async def _attempt(self, state: JobState, request: JobRequest,
                       decoded: tuple[list[Any], list[Any]] | None) -> tuple[str, Any]:
        """One run: ("ok", (files, result)) or ("failed", a client-safe reason). `decoded`: the photos and
        the fixed photos, decoded (None on a rerun: read from the store)."""
        def on_progress(done: int, total: int) -> None:
            state.steps_done, state.steps_total = done, total

        try:
            cfg = self.config.with_engine(request.config)  # the server's plumbing, the job's engine settings
            if decoded is None:  # a rerun: the photos come from the store
                files = await self._io(self.store.inputs, state.job_id, len(request.names) + request.fixed_count)
                decoded = (await self._io(decode_photos, files[:len(request.names)], request.names, self.limits,
                                          cfg.output),
                           await self._io(decode_photos, files[len(request.names):], [], self.limits))
            photos, held = decoded
            protected, record = await self._protect_in_time([d.rgb for d in photos], cfg, request.identity,
                                                            on_progress, [d.rgb for d in held])
            files, result = await self._io(build_result, request.names, photos, protected, record, cfg)
        except JobTimeout as exc:
            return "failed", str(exc)
        except RequestError as exc:  # a rerun's photo no longer decodes
            return "failed", f"invalid input: {exc.detail}"
        except Exception as exc:  # noqa: BLE001 - the job records a client-safe reason; the replica goes on
            return "failed", errors.public_error(exc, state.job_id)
        return "ok", (files, result)

    async def _protect_in_time(self, rgbs: list[Any], cfg: CaprayConfig, identity: str,
                               on_progress: Callable[[int, int], None], fixed: list[Any]) -> tuple[list[Any], Any]:
        """The Protector call, failed `serve.job_timeout_s` after it started running, busy refusals retried.

        The limit counts from the call's first progress event (the Protector sends one as the group gets
        its device), so time queued behind other groups or waiting for replicas to scale up is not charged
        to the run. Waiting to start is bounded by `serve.job_timeout_s` as well: a call refused for
        backpressure (every queue full, replicas still starting) is retried with backoff until then.
        """
        limit = self.limits.job_timeout_s
        start_by = time.monotonic() + limit
        delay = BACKOFF_S
        while True:
            started: list[float] = []

            def progress(done: int, total: int, started: list[float] = started) -> None:  # this attempt's clock
                if not started:
                    started.append(time.monotonic())
                on_progress(done, total)

            call = asyncio.ensure_future(self.protect(rgbs, cfg, identity, progress, fixed))
            try:
                return await _within(call, started, start_by, limit)
            except Exception as exc:
                if not errors.is_busy(exc) or time.monotonic() >= start_by:
                    raise
            finally:
                if not call.done():  # timed out or cancelled: stop occupying the Protector's queue
                    call.cancel()
                    await asyncio.gather(call, return_exceptions=True)
            errors.log.info("Protector busy; retrying in %.1f s", delay)
            await asyncio.sleep(min(delay, max(start_by - time.monotonic(), 0.0)))  # the last try at start_by
            delay = min(delay * 2, MAX_BACKOFF_S)

    def cancel(self, job_id: str) -> None:
        """Stop running `job_id` here, if it runs here (a deleted job: its Protector call ends at its next
        PGD step). A runner elsewhere stops when its lease renewal finds the status gone."""
        task = self.running.get(job_id)
        if task is not None:
            task.cancel()

    # -- the sweep ------------------------------------------------------------------------------
    async def sweep(self) -> None:
        """Take over pending jobs whose runner is gone; repair what a crash left half-done; delete finished
        jobs past their TTL."""
        for job_id, owner in await self._io(self.store.pending):
            if job_id in self.running:
                continue
            seen = await self._io(self.store.peek, job_id)
            if seen is None:  # the replica died inside `create`, before the status
                await self._io(self._orphan, job_id, owner)
                continue
            state = JobState.model_validate(seen.body)  # expired by the TTL its holder renews for
            if state.status != "pending":  # it died after the final status, before the markers
                await self._io(self.store.settle, state)
            elif seen.age_s > float(seen.body.get("ttl_s", self.limits.job_lease_s)) or state.holder is None:
                await self._adopt(seen, state)
        for marker, job_id in await self._io(self.store.expired, self.limits.job_ttl_s):
            await self._io(self.store.expire, marker, job_id)

    def _orphan(self, job_id: str, owner: str | None) -> None:
        """A pending marker with no status past the lease time: its uploads are deleted (nobody will run it)."""
        age = self.store.marker_age(job_id, owner)
        if age is not None and age > self.limits.job_lease_s and self.store.peek(job_id) is None:
            errors.log.warning("job %s: its upload never completed (replica lost while storing it); deleted", job_id)
            self.store.delete(job_id, owner)

    async def _adopt(self, seen: Seen, state: JobState) -> None:
        """Take the job over (exactly one replica's take-over of the version `seen` succeeds) and run it,
        or fail it when its runners kept vanishing or its request is gone."""
        previous, state.holder = state.holder, self.tag
        give_up = (f"its runner was lost {state.attempts} time(s) (server restarts); not retried again"
                   if state.attempts >= self.limits.job_attempts else None)
        request = None if give_up else await self._io(self.store.request, state.job_id)
        if give_up is None and request is None:
            give_up = "the job's request is missing from the store"
        if give_up is None:
            state.attempts += 1
        claim = await self._io(self.store.take_over, seen, state, self.limits.job_lease_s)
        if claim is None:
            return  # another replica adopted it, or it finished, since the sweep read it
        if give_up is not None:
            await self._io(self.store.fail, claim, state, give_up)
            return
        errors.log.info("job %s: adopted from runner %s (attempt %d)", state.job_id, previous, state.attempts)
        self._spawn(claim, request, None)

    async def sweep_forever(self) -> None:
        while True:
            try:
                await self.sweep()
            except Exception as exc:  # noqa: BLE001 - a storage hiccup must not end the sweeper
                errors.log.warning("job sweep failed: %r", exc)
            await asyncio.sleep(max(self.limits.job_lease_s / 3, 0.5))

