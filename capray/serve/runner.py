"""Running jobs from the durable store, in whichever ingress replica is alive.

A runner holds a job by a lease it renews (with the progress) while the Protector works; every
replica sweeps the store's pending jobs and takes over one whose lease ran out — its runner was
lost to a restart, a node loss or an upgrade. A rerun is safe because the same request gives the
same pixels; after `serve.job_attempts` runs the job is failed with the reason instead. The same
sweep deletes finished jobs past `serve.job_ttl_s`. Every job ends `done` or `failed`, with a
client-safe error (`errors.public_error`), or within `serve.job_timeout_s`.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any, Awaitable, Callable

from capray.config import CaprayConfig
from capray.serve import errors
from capray.serve.limits import RequestError
from capray.serve.requests import Submission, decode_photos
from capray.serve.results import build_result
from capray.serve.store import JobRequest, JobState, JobStore

# protect(rgbs, cfg, identity, on_progress) -> (protected rgbs, ProtectionRecord)
ProtectCall = Callable[[list[Any], CaprayConfig, str, Callable[[int, int], None]], Awaitable[tuple[list[Any], Any]]]


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
    async def submit(self, sub: Submission, decoded: list[Any], cfg: CaprayConfig, owner: str) -> JobState:
        """Store the job (request and photo files first), then run it here."""
        now = time.time()
        request = JobRequest(job_id=uuid.uuid4().hex, owner=owner, identity=sub.identity, names=sub.names,
                             config=cfg.model_dump(mode="json"), created_at=now)
        state = JobState(job_id=request.job_id, owner=owner, created_at=now, updated_at=now,
                         steps_total=cfg.attack.total_pgd_steps, runner=self.tag, attempts=1,
                         lease_until=now + self.limits.job_lease_s)
        await self._io(self.store.create, request, sub.files, state)
        self._spawn(state, request, decoded)
        return state

    def _spawn(self, state: JobState, request: JobRequest, decoded: list[Any] | None) -> None:
        task = asyncio.create_task(self._run(state, request, decoded))
        self.running[state.job_id] = task
        task.add_done_callback(lambda _: self.running.pop(state.job_id, None))

    async def _run(self, state: JobState, request: JobRequest, decoded: list[Any] | None) -> None:
        write = asyncio.Lock()

        async def save() -> None:
            async with write:
                state.lease_until = time.time() + self.limits.job_lease_s
                await self._io(self.store.put_state, state)

        async def heartbeat() -> None:  # renews the lease and publishes progress
            while True:
                await asyncio.sleep(self.heartbeat_s)
                await save()

        def on_progress(done: int, total: int) -> None:
            state.steps_done, state.steps_total = done, total

        beat = asyncio.create_task(heartbeat())
        try:
            try:
                cfg = CaprayConfig.model_validate(request.config)
                if decoded is None:  # a rerun: the photos come from the store
                    files = await self._io(self.store.inputs, state.job_id, len(request.names))
                    decoded = await self._io(decode_photos, files, request.names, self.limits)
                protected, record = await asyncio.wait_for(
                    self.protect([d.rgb for d in decoded], cfg, request.identity, on_progress),
                    timeout=self.limits.job_timeout_s)
                pngs, result = await self._io(build_result, request.identity, request.names, decoded, protected,
                                              record, cfg)
            except asyncio.TimeoutError:
                outcome = ("failed", errors.timed_out(self.limits.job_timeout_s))
            except RequestError as exc:  # a rerun's photo no longer decodes
                outcome = ("failed", f"invalid input: {exc.detail['error']}")
            except Exception as exc:  # noqa: BLE001 - the job records a client-safe reason; the replica goes on
                outcome = ("failed", errors.public_error(exc, state.job_id))
            else:
                outcome = ("done", (pngs, result))
        finally:  # a cancelled runner (replica stopping) leaves the job pending: its lease runs out, another takes it
            beat.cancel()
        async with write:
            if outcome[0] == "done":
                pngs, result = outcome[1]
                await self._io(self.store.finish, state, pngs, result.model_dump_json().encode())
            else:
                await self._io(self.store.fail, state, outcome[1])

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
                                                   "not retried again")
            return
        request = await self._io(self.store.request, state.job_id)
        if request is None:
            await self._io(self.store.fail, state, "the job's request is missing from the store")
            return
        state.runner, state.attempts = self.tag, state.attempts + 1
        state.lease_until = time.time() + self.limits.job_lease_s
        await self._io(self.store.put_state, state)
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

