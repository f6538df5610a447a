"""Running jobs from the durable store, in whichever ingress replica is alive.

A runner holds a job by a lease it renews (with the progress) while the Protector works; every
replica sweeps the store's pending jobs and takes over one whose lease ran out — its runner was
lost to a restart, a node loss or an upgrade. A rerun is safe because the same request gives the
same pixels; after `serve.job_attempts` runs the job is failed with the reason instead. The same
sweep deletes finished jobs past `serve.job_ttl_s`. Every job ends `ok` or `failed`, with a
client-safe error (`errors.public_error`): at most `serve.job_timeout_s` after the Protector starts
it, and failed if no Protector starts it within `serve.job_timeout_s` (busy refusals are retried).

Every status write after the first checks that the stored job is still pending and held by this
runner (`JobStore.put_state(runner=…)`): a late heartbeat or a second runner that adopted the same
job never rewrites a finished job, nor one another replica now runs.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from capray.config import ENGINE_SECTIONS, CaprayConfig
from capray.serve import errors
from capray.serve.limits import RequestError
from capray.serve.requests import Submission, decode_photos
from capray.serve.results import build_result
from capray.serve.store import JobRequest, JobState, JobStore

# protect(rgbs, cfg, identity, on_progress, fixed rgbs) -> (protected rgbs, ProtectionRecord)
ProtectCall = Callable[[list[Any], CaprayConfig, str, Callable[[int, int], None], list[Any]],
                       Awaitable[tuple[list[Any], Any]]]


BACKOFF_S, MAX_BACKOFF_S = 0.5, 15.0  # retrying a Protector call refused for backpressure


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
                     held: list[Any] = ()) -> JobState:
        """Store the job (request and photo files first, the fixed photos after them), then run it here."""
        now = time.time()
        request = JobRequest(job_id=uuid.uuid4().hex, owner=owner, identity=sub.identity, names=sub.names,
                             fixed_count=len(sub.fixed_files), created_at=now,
                             config=cfg.model_dump(mode="json", include=set(ENGINE_SECTIONS)))
        state = JobState(job_id=request.job_id, owner=owner, created_at=now, updated_at=now,
                         steps_total=cfg.attack.total_pgd_steps, runner=self.tag, attempts=1,
                         lease_until=now + self.limits.job_lease_s)
        await self._io(self.store.create, request, [*sub.files, *sub.fixed_files], state)
        self._spawn(state, request, (decoded, list(held)))
        return state

    def _spawn(self, state: JobState, request: JobRequest, decoded: tuple[list[Any], list[Any]] | None) -> None:
        task = asyncio.create_task(self._run(state, request, decoded))
        self.running[state.job_id] = task
        task.add_done_callback(lambda _: self.running.pop(state.job_id, None))

    async def _run(self, state: JobState, request: JobRequest, decoded: tuple[list[Any], list[Any]] | None) -> None:
        stop = asyncio.Event()
        attempt = asyncio.ensure_future(self._attempt(state, request, decoded))

        async def heartbeat() -> None:
            """Renews the lease and publishes progress; ends when told to, or once the job is not this runner's
            (then the run is cancelled: the Protector stops at its next PGD step instead of finishing for no one)."""
            while True:
                try:
                    await asyncio.wait_for(stop.wait(), self.heartbeat_s)
                    return
                except TimeoutError:
                    pass
                state.lease_until = time.time() + self.limits.job_lease_s
                try:
                    if not await self._io(self.store.put_state, state, self.tag):
                        errors.log.warning("job %s: taken over or finished elsewhere; runner %s stops running it",
                                           state.job_id, self.tag)
                        attempt.cancel()
                        return
                except Exception as exc:  # noqa: BLE001 - a storage hiccup: the next beat tries again
                    errors.log.warning("job %s: lease renewal failed: %r", state.job_id, exc)

        beat = asyncio.create_task(heartbeat())
        try:
            status, detail = await attempt
        except asyncio.CancelledError:
            if beat.done():  # the heartbeat cancelled a job that is no longer ours: nothing to write
                return
            raise  # this runner is cancelled (replica stopping): the job stays pending, its lease runs out
        finally:
            stop.set()
            await beat  # a write already in a worker thread lands before the final one, never after it
        if status == "ok":
            pngs, result = detail
            wrote = await self._io(self.store.finish, state, pngs, result.model_dump_json().encode(), self.tag)
        else:
            wrote = await self._io(self.store.fail, state, detail, self.tag)
        if not wrote:
            errors.log.warning("job %s: finished or taken over elsewhere; runner %s drops its %s outcome",
                               state.job_id, self.tag, status)

    async def _attempt(self, state: JobState, request: JobRequest,
                       decoded: tuple[list[Any], list[Any]] | None) -> tuple[str, Any]:
        """One run: ("ok", (pngs, result)) or ("failed", a client-safe reason). `decoded`: the photos and
        the fixed photos, decoded (None on a rerun: read from the store)."""
        def on_progress(done: int, total: int) -> None:
            state.steps_done, state.steps_total = done, total

        try:
            cfg = self.config.with_engine(request.config)  # the server's plumbing, the job's engine settings
            if decoded is None:  # a rerun: the photos come from the store
                files = await self._io(self.store.inputs, state.job_id, len(request.names) + request.fixed_count)
                decoded = (await self._io(decode_photos, files[:len(request.names)], request.names, self.limits),
                           await self._io(decode_photos, files[len(request.names):], [], self.limits))
            photos, held = decoded
            protected, record = await self._protect_in_time([d.rgb for d in photos], cfg, request.identity,
                                                            on_progress, [d.rgb for d in held])
            pngs, result = await self._io(build_result, request.names, photos, protected,
                                          record, cfg)
        except JobTimeout as exc:
            return "failed", str(exc)
        except RequestError as exc:  # a rerun's photo no longer decodes
            return "failed", f"invalid input: {exc.detail['error']}"
        except Exception as exc:  # noqa: BLE001 - the job records a client-safe reason; the replica goes on
            return "failed", errors.public_error(exc, state.job_id)
        return "ok", (pngs, result)

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

    # -- the sweep ------------------------------------------------------------------------------
    async def sweep(self) -> None:
        """Take over pending jobs whose runner is gone; delete finished jobs past their TTL."""
        now = time.time()
        for job_id in await self._io(self.store.pending_ids):
            if job_id in self.running:
                continue
            state = await self._io(self.store.state, job_id)
            if state is None or state.status != "pending":
                await self._io(self.store.drop_marker, job_id)  # a finish that stopped between its two writes
            elif state.lease_until < now:
                await self._adopt(state)
        for marker, job_id in await self._io(self.store.expired, self.limits.job_ttl_s):
            await self._io(self.store.expire, marker, job_id)

    async def _adopt(self, state: JobState) -> None:
        if state.attempts >= self.limits.job_attempts:
            await self._io(self.store.fail, state, f"its runner was lost {state.attempts} time(s) (server restarts); "
                                                   "not retried again", state.runner)
            return
        request = await self._io(self.store.request, state.job_id)
        if request is None:
            await self._io(self.store.fail, state, "the job's request is missing from the store", state.runner)
            return
        previous = state.runner
        state.runner, state.attempts = self.tag, state.attempts + 1
        state.lease_until = time.time() + self.limits.job_lease_s
        if not await self._io(self.store.put_state, state, previous):
            return  # it finished, or another replica took it, since the sweep read it
        await asyncio.sleep(0.2)  # two replicas adopting at once: the last writer runs it, the other backs off
        current = await self._io(self.store.state, state.job_id)
        if current is not None and current.runner == self.tag and current.status == "pending":
            self._spawn(current, request, None)

    async def sweep_forever(self) -> None:
        while True:
            try:
                await self.sweep()
            except Exception as exc:  # noqa: BLE001 - a storage hiccup must not end the sweeper
                errors.log.warning("job sweep failed: %r", exc)
            await asyncio.sleep(max(self.limits.job_lease_s / 3, 0.5))

