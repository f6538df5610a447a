"""The Ray Serve application: stateless CPU FastAPI `Ingress` replicas in front of an autoscaling GPU `Protector`.

* `Protector` (class `ProtectorDeployment`) holds one `capray.Protector` per replica (models loaded once)
  and calls it for each group — the same object the batch job's actors hold, so a
  group protected online or in bulk with the same config, seed and identity gets the same pixels.
  It streams progress (PGD steps done / total) back to the caller while the engine runs.
* `Ingress` authenticates (`auth.py`), enforces every limit before the work it prevents
  (`limits.py`, `requests.py`), keeps jobs in the durable store (`store.py`) and runs them
  (`runner.py`); any replica answers any job, so it scales like any stateless deployment.

API (`Authorization: Bearer <key>` on every /v1 route but healthz when keys are configured; docs/endpoint.md,
docs/openapi.json):
  GET  /                                the web page (no key: it asks for one) and its /static/ assets
  POST /v1/protect                      JSON {photos: [{data: base64, name?}], identity?, config?, fixed?,
                                        fixed_jobs?} or multipart: photo=@a.jpg (repeated), fixed=@b.png
                                        (repeated), options={"identity", "config", "fixed_jobs"}
                                        → 202 {job_id, status, status_url} + Location, Retry-After
                                        (Idempotency-Key: a retry gets the same job, never a second run;
                                        fixed / fixed_jobs: the person's published protected photos,
                                        held fixed in CAP's group; only `photos` are protected)
  GET  /v1/jobs                         the caller's jobs, newest first (?limit, ?cursor → next_cursor)
  GET  /v1/jobs/{id}                    → {status: pending|ok|failed, progress, error?, result?} (+ Retry-After
                                        while pending)
  GET  /v1/jobs/{id}/photos/{index}     → one protected photo (image/png, or image/webp: config.output.format)
  GET  /v1/jobs/{id}/result.zip         → every protected photo + summary.json
  DELETE /v1/jobs/{id}                  → 204: uploads, results and records removed now (a running job stops)
  POST /v1/protect:sync                 same bodies → 200 result with base64 photos (small requests)
  GET  /v1/healthz                      → {"status": "ok"}
  GET  /openapi.json                    the OpenAPI document (with a key)
Every refusal is RFC 9457 `application/problem+json` with a stable `type` (`problems.py`).

Autoscaling and limits come from `ServeConfig` (`serve:` in the capray config); `deploy_config`
renders the Serve YAML for `serve deploy` / a KubeRay RayService from the same settings.
"""

# no `from __future__ import annotations`: FastAPI (through serve.ingress) needs real annotations

import asyncio
import base64
import contextlib
import logging
import threading
import time
import uuid
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from capray.attack.api import ProtectionRecord
from capray.config import CaprayConfig, ServeConfig, ShardingConfig, load_config
from capray.distributed.pool import ScoringPool
from capray.io.images import MEDIA_TYPES
from capray.metrics import LAMBDA_COLLAPSED, SERVE_GROUPS, Metric
from capray.serve import errors, problems
from capray.serve.auth import KeyRing, check_exposure
from capray.serve.body_limit import missing_guard
from capray.serve.limits import KeyLimits, UploadSlots, check_pixels, effective_config
from capray.serve.problems import RequestError
from capray.serve.requests import check_counts, decode_photos, read_submission, submission_digest
from capray.serve.results import build_result, result_zip
from capray.serve.runner import JobRunner, new_job_id
from capray.serve.schemas import JobAccepted, JobList, JobResult, JobStatus, JobSummary, Progress, ProtectRequest, utc
from capray.serve.store import OWNER_MARKER, Idempotent, JobState, JobStore, key_digest

APP_NAME = "capray"
IMPORT_PATH = "capray.serve.app:build_app"
CLUSTER_HOST = "0.0.0.0"  # what deploy_config binds: every node's proxy, reachable from the network
REPLICA_HEADER = "x-capray-replica"  # which ingress replica answered (a random tag, no address)
POLL_AFTER_S = 2  # Retry-After while a job is pending: a status read is one small store read
MAX_IDEMPOTENCY_KEY = 200
BODY_DOC = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"$ref": "#/components/schemas/ProtectRequest"}},
    "multipart/form-data": {"schema": {"type": "object", "required": ["photo"], "properties": {
        "photo": {"type": "array", "items": {"type": "string", "format": "binary"}},
        "options": {"type": "string", "description": 'JSON: {"identity": …, "config": {…}}'}}}}}}}

# No /docs or /redoc, and FastAPI's own /openapi.json is off: FastAPI serves them without a key. The
# document is served to authenticated callers by `Ingress.openapi_document`, and published (docs/openapi.json).
api = FastAPI(title="capray", version="1", description="Protect a person's photos against DreamBooth "
              "personalization (CAP: group-aware adversarial perturbations). Every refusal is RFC 9457 "
              "`application/problem+json` with a stable `type` (`urn:capray:problem:<slug>`).",
              docs_url=None, redoc_url=None, openapi_url=None)
PUBLIC = {"/v1/healthz"}  # API routes that need no key (the page and its assets are not in the document)
AUTH_PROBLEMS = ("unauthorized", "invalid-key", "forbidden", "keys-unavailable")
JOB_PROBLEMS = (*AUTH_PROBLEMS, "not-found", "malformed-request")
SUBMIT_PROBLEMS = (*AUTH_PROBLEMS, "server-busy", "too-many-jobs", "rate-limited", "body-too-large", "body-too-slow",
                   "too-many-photos", "photo-too-large", "too-many-pixels", "unsupported-format",
                   "unsupported-media-type", "invalid-photo", "no-photos", "malformed-request", "config-not-settable",
                   "invalid-config", "over-server-limits", "not-found", "not-finished")


def openapi_document() -> dict[str, Any]:
    """The OpenAPI document of `api`: a Bearer security scheme on every route but the public ones, and
    the Problem schema every error response refers to (`capray serve --openapi FILE` writes it)."""
    if api.openapi_schema is None:
        doc = get_openapi(title=api.title, version=api.version, description=api.description, routes=api.routes)
        components = doc.setdefault("components", {})
        schemas = components.setdefault("schemas", {})
        for model in (ProtectRequest, problems.Problem):  # bodies FastAPI does not see (read by hand, or errors)
            schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(schema.pop("$defs", {}))
            schemas[model.__name__] = schema
        components["securitySchemes"] = {"HTTPBearer": {"type": "http", "scheme": "bearer",
                                                        "description": "an API key of this server"}}
        for path, operations in doc["paths"].items():
            for operation in operations.values():
                responses = operation.setdefault("responses", {})
                if "422" in responses and problems.MEDIA_TYPE not in responses["422"].get("content", {}):
                    responses["422"] = problems.responses("malformed-request")[422]  # ours, not FastAPI's shape
                if path not in PUBLIC:
                    operation["security"] = [{"HTTPBearer": []}]
        for unused in ("HTTPValidationError", "ValidationError"):  # FastAPI's error shapes: no route gives them
            schemas.pop(unused, None)
        api.openapi_schema = doc
    return api.openapi_schema


api.openapi = openapi_document


# Helpers come before the deployments: `@serve.deployment` serializes the class when the decorator runs,
# so module globals defined after it would be missing in the replicas.

def _problem(request: Request, refused: RequestError) -> JSONResponse:
    return JSONResponse(refused.body(request.url.path), status_code=refused.status, headers=refused.headers,
                        media_type=problems.MEDIA_TYPE)


@api.exception_handler(RequestError)
async def _refused(request: Request, exc: RequestError) -> JSONResponse:
    return _problem(request, exc)


@api.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    found = [{"loc": ".".join(map(str, e["loc"])), "msg": e["msg"]} for e in exc.errors()]
    return _problem(request, RequestError("malformed-request", "malformed request", errors=found))


@api.exception_handler(StarletteHTTPException)
async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    slug = {404: "not-found", 405: "method-not-allowed"}.get(exc.status_code, "malformed-request")
    refused = RequestError(slug, str(exc.detail))
    refused.status = exc.status_code  # Starlette's own status (e.g. 400), with the nearest problem type
    return _problem(request, refused)


def _not_found(job_id: str) -> RequestError:
    return RequestError("not-found", "no such job (unknown, not yours, or its result has expired)", job_id=job_id)


class Abandoned(RuntimeError):
    """Raised in the engine's thread at a PGD step boundary once nobody waits for the group any more."""


@serve.deployment(name="Protector")  # the deployment's name is what serve configs and k8s/ refer to
class ProtectorDeployment:
    """One GPU (or CPU) replica: a `capray.Protector` resident, one group at a time through it."""

    def __init__(self, config: dict[str, Any], scoring_pool: DeploymentHandle | None = None):
        from capray.distributed.pool import PoolClient
        from capray.protector import Protector

        cfg = CaprayConfig.model_validate(config)
        self.sharding = cfg.sharding  # server-owned: a request cannot turn it on or size it
        self.scoring_pool = PoolClient.for_serve(scoring_pool) if scoring_pool is not None else None
        self.stuck_after_s = cfg.serve.job_timeout_s + 60
        self.protector = Protector.from_config(cfg)
        # One group at a time on the device: a second ongoing request waits here (Serve still counts it,
        # so the autoscaler sees the load) instead of doubling GPU memory and sharing the models across threads.
        self.device_lock = asyncio.Lock()
        self.busy_since: float | None = None

    async def protect(self, rgbs: list[Any], config: dict[str, Any], identity: str, progress: bool = True,
                      fixed: list[Any] | None = None):
        """Streams ("progress", (done, total)) events, then ("result", (protected, record)).

        `fixed`: published protected photos of the person, held fixed in CAP's group (append).

        `progress=False` (the sync endpoint, which has no one to tell) streams the result alone: each
        event is a Ray object and a hop through the event loops, a measurable part of a small request."""
        from capray.distributed.candidates import evaluator_factory_for

        cfg = CaprayConfig.model_validate(config)
        if cfg.model != self.protector.config.model:
            raise ValueError("this replica serves a different model configuration")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        abandoned = threading.Event()  # the caller went away (job timeout, lost lease, client gone)

        def step_done(done: int, total: int) -> None:  # called on the engine's thread after every PGD step
            if abandoned.is_set():
                raise Abandoned("the caller cancelled this group")  # ends the engine at a step boundary
            if progress:
                loop.call_soon_threadsafe(events.put_nowait, (done, total))

        # The lock is released when the engine thread really ends, not when this call is cancelled: a thread
        # cannot be interrupted, so the next group waits until the current PGD step is over (or, for a hung
        # engine, check_health fails and Serve replaces the replica).
        await self.device_lock.acquire()
        self.busy_since = time.monotonic()
        sharded = evaluator_factory_for(self.sharding, self.scoring_pool)
        work = asyncio.ensure_future(asyncio.to_thread(self._protect, rgbs, cfg, identity, step_done, sharded,
                                                       fixed or []))
        work.add_done_callback(self._engine_done)
        try:
            if progress:
                yield "progress", (0, cfg.attack.total_pgd_steps)  # the group has the device: its clock starts
            while progress and not work.done():
                event = asyncio.ensure_future(events.get())
                await asyncio.wait({work, event}, return_when=asyncio.FIRST_COMPLETED)
                if event.done():
                    yield "progress", event.result()
                else:
                    event.cancel()
            yield "result", await asyncio.shield(work)  # a cancelled caller must not mark the thread done
        finally:
            if not work.done():
                abandoned.set()

    def _protect(self, rgbs, cfg, identity, step_done, sharded, fixed):
        result = self.protector(rgbs, identity, fixed=fixed, config=cfg, progress=step_done,
                                evaluator_factory=sharded)
        return result.arrays, result.record

    def _engine_done(self, work: asyncio.Future) -> None:
        if not work.cancelled():
            work.exception()  # an abandoned group's Abandoned is expected; nobody else is left to read it
        self.busy_since = None
        self.device_lock.release()

    def check_health(self) -> None:
        """A call far past the job time limit means a hung engine: fail the check so Serve replaces the replica."""
        if self.busy_since is not None and time.monotonic() - self.busy_since > self.stuck_after_s:
            raise RuntimeError("engine call running past serve.job_timeout_s")


# The app's pool of scoring actors (`sharding.mode` auto/always): one bookkeeping replica that owns the
# scoring actors and lends them to Protector replicas per scoring call (capray.distributed.pool).
ScoringPoolDeployment = serve.deployment(name="ScoringPool")(ScoringPool)


async def _call_protector(handle: DeploymentHandle, rgbs: list[Any], cfg: CaprayConfig, identity: str,
                          on_progress=None, fixed: list[Any] = ()) -> tuple[list[Any], ProtectionRecord]:
    """The Protector's result; its progress events go to `on_progress` (None: not sent at all)."""
    stream = handle.options(stream=True).protect.remote(rgbs, cfg.model_dump(mode="json"), identity,
                                                        on_progress is not None, list(fixed))
    try:
        async for kind, value in stream:
            if kind == "progress":
                on_progress(*value)
            else:
                return value
    except BaseException:
        stream.cancel()  # a timed-out or cancelled job stops occupying the Protector's queue
        raise
    raise RuntimeError("the Protector ended without a result")


def _job_fields(state: JobState) -> dict[str, Any]:
    """What every view of a job (its status, its line in the list) shows of the stored state."""
    return {"job_id": state.job_id, "status": state.status, "created_at": utc(state.created_at),
            "finished_at": utc(state.finished_at),
            "progress": Progress(steps_done=state.steps_done, steps_total=state.steps_total)}


def _job_status(state: JobState, result: JobResult | None, base: str) -> JobStatus:
    if result is not None:
        for i, photo in enumerate(result.photos):
            photo.url = f"{base}/photos/{i}"
    return JobStatus(**_job_fields(state), attempts=state.attempts, error=state.error,
                     result_zip_url=f"{base}/result.zip" if state.status == "ok" else None, result=result)


def _pending_headers(status: str) -> dict[str, str]:
    """A pending job's responses say when to look again (RFC 9110 Retry-After)."""
    return {"Retry-After": str(POLL_AFTER_S)} if status == "pending" else {}


def _cursor(marker: str | None) -> str | None:
    return None if marker is None else base64.urlsafe_b64encode(marker.encode()).decode().rstrip("=")


def _after(cursor: str | None) -> str | None:
    """The owner marker a list cursor names, or 422 for anything else (a cursor is opaque to the client)."""
    if cursor is None:
        return None
    try:
        marker = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (ValueError, UnicodeDecodeError):
        marker = ""
    if not OWNER_MARKER.fullmatch(marker):
        raise RequestError("malformed-request", "cursor is not one this server gave", cursor=cursor[:100])
    return marker


def _idempotency_key(request: Request) -> str | None:
    key = request.headers.get("idempotency-key")
    if key is not None and not (0 < len(key) <= MAX_IDEMPOTENCY_KEY and key.isprintable() and key.isascii()):
        raise RequestError("malformed-request", f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} printable "
                                                "ASCII characters")
    return key


@serve.deployment(name="Ingress")
@serve.ingress(api)
class Ingress:
    async def __init__(self, protector: DeploymentHandle, config: dict[str, Any], listen_host: str):
        self.protector = protector
        self.config = CaprayConfig.model_validate(config)
        s = self.config.serve
        self.keys = KeyRing(s.api_keys_file)
        check_exposure(listen_host, self.keys, s.allow_unauthenticated)
        unguarded = missing_guard(s.max_request_bytes)  # this replica's node environment is its proxy's
        if unguarded:
            logging.getLogger("ray.serve").warning("capray: %s", unguarded)
        self.tag = uuid.uuid4().hex[:8]
        self.store = JobStore(s.store, s.store_options)
        self.runner = JobRunner(self.store, self.config, self._protect, self.tag)
        self.sync_in_flight = 0
        self.uploads = UploadSlots(s.max_uploads_in_flight)
        self.key_limits = KeyLimits(s)
        self.finished = Metric(SERVE_GROUPS, serve=True)
        self.collapsed = Metric(LAMBDA_COLLAPSED, serve=True)
        self.sweeper = asyncio.get_running_loop().create_task(self.runner.sweep_forever())

    async def _protect(self, rgbs, cfg, identity, on_progress, fixed=()):
        try:
            out = await _call_protector(self.protector, rgbs, cfg, identity, on_progress, fixed)
        except BaseException as exc:  # a busy refusal is retried by the runner: not a failed group
            self.finished.inc(outcome="busy" if errors.is_busy(exc) else "failed")
            raise
        self.finished.inc(outcome="ok")
        if out[1].lambda_collapsed:
            self.collapsed.inc()
        return out

    def _caller(self, request: Request, right: str | None = None) -> str:
        return self.keys.authenticate(request.headers.get("authorization"), right)

    @contextlib.asynccontextmanager
    async def _admitted(self, request: Request, owner: str):
        """Capacity and the caller's own limits first (nothing read yet), then the body, the overrides,
        the fixed photos (uploaded, or a finished job of the same caller), formats and the pixel budget,
        the decode.

        All of it, and whatever the caller does inside (storing the job), holds one of this replica's
        upload slots (`serve.max_uploads_in_flight`) and counts as one of the caller's requests in
        progress (`serve.max_jobs_per_key`): the body is in memory until then.
        """
        jobs = await asyncio.to_thread(self.store.pending)
        if len(jobs) + self.sync_in_flight + self.uploads.used >= self.config.serve.capacity:
            raise RequestError("server-busy", "server busy: too many pending jobs, retry later",
                               headers={"Retry-After": "30"})
        declared = request.headers.get("content-length", "")
        self.key_limits.check(owner, sum(1 for _, of in jobs if of == owner),
                              int(declared) if declared.isdigit() else None)
        with self.uploads.take(), self.key_limits.take(owner):
            sub = await read_submission(request, self.config.serve, lambda n: self.key_limits.charge(owner, n))
            cfg = effective_config(self.config, sub.config)
            if sub.fixed_jobs:
                published = [png for job_id in dict.fromkeys(sub.fixed_jobs)
                             for png in await self._published_by(owner, job_id)]
                sub.fixed_files = [*published, *sub.fixed_files]
                check_counts(len(sub.files), self.config.serve, len(sub.fixed_files))
            await asyncio.to_thread(check_pixels, [*sub.files, *sub.fixed_files], self.config.serve)
            decoded = await asyncio.to_thread(decode_photos, sub.files, sub.names, self.config.serve, cfg.output)
            held = await asyncio.to_thread(decode_photos, sub.fixed_files, [], self.config.serve)
            yield sub, cfg, decoded, held

    async def _published_by(self, owner: str, job_id: str) -> list[bytes]:
        """The protected photo files of the caller's finished job `job_id` (404 for anyone else's)."""
        state = await self._job_of(owner, job_id)
        if state.status != "ok":
            raise RequestError("not-finished", f"fixed job is {state.status}: only a finished job's photos can be "
                                               "held fixed", job_id=job_id)
        result = JobResult.model_validate_json(await asyncio.to_thread(self.store.result, job_id))
        files = [await asyncio.to_thread(self.store.photo, job_id, i, photo.format)
                 for i, photo in enumerate(result.photos)]
        if any(data is None for data in files):
            raise _not_found(job_id)
        return files

    async def _owned(self, request: Request, job_id: str, right: str = "read") -> JobState:
        return await self._job_of(self._caller(request, right), job_id)

    async def _job_of(self, owner: str, job_id: str) -> JobState:
        state = await asyncio.to_thread(self.store.state, job_id)
        if state is None or state.owner != owner:
            raise _not_found(job_id)
        if state.finished_at is not None and time.time() - state.finished_at > self.config.serve.job_ttl_s:
            await asyncio.to_thread(self.store.delete, job_id, owner)
            raise _not_found(job_id)
        return state

    async def _finished(self, request: Request, job_id: str) -> JobState:
        state = await self._owned(request, job_id)
        if state.status != "ok":
            raise RequestError("not-finished", f"job is {state.status}, no result to download", job_id=job_id)
        return state

    # -- the page and the document -----------------------------------------------------------------
    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(self, request: Request) -> Response:
        from capray.serve import page

        if not request.url.path.endswith("/"):  # under a route prefix: its relative asset URLs need the slash
            return RedirectResponse(str(request.url.replace(path=request.url.path + "/")), status_code=308)
        return HTMLResponse(page.render(self._page_info()), headers={
            "Content-Security-Policy": page.CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
            "Cache-Control": "no-cache"})

    @api.get("/static/{name}", include_in_schema=False)
    async def page_asset(self, name: str) -> Response:
        from capray.serve import page

        if name not in page.ASSETS:
            raise RequestError("not-found", "no such file")
        return Response(page.asset(name), media_type=page.ASSETS[name],
                        headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"})

    def _page_info(self) -> dict[str, Any]:
        """What the page tells a person before they upload: the limits they will meet and the model's notes."""
        from capray.io.images import accepted_names

        s = self.config.serve
        return {"tiny_model": self.config.model.is_tiny, "notes": list(self.config.model.notes),
                "max_photos": s.max_photos, "max_photo_bytes": s.max_photo_bytes,
                "max_request_bytes": s.max_request_bytes, "max_request_pixels": s.max_request_pixels,
                "min_image_side": s.min_image_side, "accept": accepted_names()}

    @api.get("/openapi.json", include_in_schema=False)
    async def openapi_json(self, request: Request) -> JSONResponse:
        self._caller(request)
        return JSONResponse(openapi_document())

    # -- the API ----------------------------------------------------------------------------------
    @api.get("/v1/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.post("/v1/protect", status_code=202, response_model=JobAccepted, openapi_extra={
        **BODY_DOC, "parameters": [{"name": "Idempotency-Key", "in": "header", "required": False,
                                    "schema": {"type": "string", "maxLength": MAX_IDEMPOTENCY_KEY},
                                    "description": "a retry with the same key and body gets the same job (never "
                                    "a second run); the same key with another body is refused (422)"}]},
        responses={202: {"headers": {"Location": {"schema": {"type": "string"}, "description": "the job's URL"},
                                     "Retry-After": {"schema": {"type": "integer"}, "description": "seconds"}}},
                   **problems.responses(*SUBMIT_PROBLEMS, "idempotency-key-reused")})
    async def submit(self, request: Request, response: Response) -> JobAccepted:
        owner = self._caller(request, "protect")
        key = _idempotency_key(request)
        digest = key_digest(key) if key else None
        first = await asyncio.to_thread(self.store.idempotent, owner, digest) if digest else None
        if first is not None:  # a retry: not refused for the job it repeats, but its body holds an upload slot
            with self.uploads.take():
                sub = await read_submission(request, self.config.serve, lambda n: self.key_limits.charge(owner, n))
            return await self._replay(request, response, first, submission_digest(sub))
        async with self._admitted(request, owner) as (sub, cfg, decoded, held):
            job_id = new_job_id()
            if digest:
                record = Idempotent(job_id=job_id, request_digest=submission_digest(sub), created_at=time.time())
                first = await asyncio.to_thread(self.store.reserve, owner, digest, record)
                if first is not None:  # a concurrent first submit with the same key recorded its job first
                    return await self._replay(request, response, first, record.request_digest)
            try:
                state = await self.runner.submit(sub, decoded, cfg, owner, held, job_id=job_id, idempotency_key=digest)
            except BaseException:
                if digest:
                    await asyncio.to_thread(self.store.release, owner, digest)
                raise
        return self._accepted(request, response, state.job_id, "pending")

    async def _replay(self, request: Request, response: Response, record: Idempotent,
                      request_digest: str) -> JobAccepted:
        """The job an Idempotency-Key's first submit created (`record`), if this is the same request; 422 if not."""
        if record.request_digest != request_digest:
            raise RequestError("idempotency-key-reused", "this Idempotency-Key was sent with another request "
                                                         "(other photos or options); use a new key for it")
        state = await asyncio.to_thread(self.store.state, record.job_id)
        response.headers["Idempotent-Replayed"] = "true"
        return self._accepted(request, response, record.job_id, state.status if state else "pending")

    def _accepted(self, request: Request, response: Response, job_id: str, status: str) -> JobAccepted:
        url = str(request.url_for("job_status", job_id=job_id))
        response.headers.update({"Location": url, REPLICA_HEADER: self.tag, **_pending_headers(status)})
        return JobAccepted(job_id=job_id, status=status, status_url=url)

    @api.get("/v1/jobs", response_model=JobList, response_model_exclude_none=True,
             responses=problems.responses(*AUTH_PROBLEMS, "malformed-request"))
    async def list_jobs(self, request: Request, response: Response,
                        limit: int = Query(20, ge=1, le=100, description="jobs per page"),
                        cursor: str | None = Query(None, description="the previous page's next_cursor")) -> JobList:
        owner = self._caller(request, "read")
        states, last = await asyncio.to_thread(self.store.jobs_of, owner, limit, _after(cursor))
        page = JobList(next_cursor=_cursor(last), jobs=[JobSummary(
            **_job_fields(st), photos=st.photos, status_url=str(request.url_for("job_status", job_id=st.job_id)))
            for st in states])
        if page.next_cursor:
            response.headers["Link"] = f'<{request.url.include_query_params(cursor=page.next_cursor)}>; rel="next"'
        return page

    @api.get("/v1/jobs/{job_id}", name="job_status", response_model=JobStatus, response_model_exclude_none=True,
             responses={200: {"headers": {"Retry-After": {"schema": {"type": "integer"},
                                                          "description": "while pending: seconds until a new look"}}},
                        **problems.responses(*JOB_PROBLEMS)})
    async def job_status(self, job_id: str, request: Request, response: Response) -> JobStatus:
        state = await self._owned(request, job_id)
        result = None
        if state.status == "ok":
            raw = await asyncio.to_thread(self.store.result, job_id)
            result = JobResult.model_validate_json(raw) if raw else None
        response.headers.update({REPLICA_HEADER: self.tag, **_pending_headers(state.status)})
        return _job_status(state, result, str(request.url_for("job_status", job_id=job_id)))

    @api.delete("/v1/jobs/{job_id}", status_code=204, response_class=Response,
                responses=problems.responses(*JOB_PROBLEMS))
    async def delete_job(self, job_id: str, request: Request) -> Response:
        """The job's uploads, results and records are removed now; a running job stops at its next PGD step."""
        state = await self._owned(request, job_id, "delete")
        await asyncio.to_thread(self.store.delete, job_id, state.owner)
        self.runner.cancel(job_id)  # here at once; a runner on another replica when its lease renewal fails
        return Response(status_code=204)

    @api.get("/v1/jobs/{job_id}/photos/{index}", response_class=Response,
             responses={200: {"content": {"image/png": {}, "image/webp": {}}},
                        **problems.responses(*JOB_PROBLEMS, "not-finished")})
    async def job_photo(self, job_id: str, index: int, request: Request) -> Response:
        await self._finished(request, job_id)
        result = JobResult.model_validate_json(await asyncio.to_thread(self.store.result, job_id))
        photo = result.photos[index] if 0 <= index < len(result.photos) else None
        data = await asyncio.to_thread(self.store.photo, job_id, index, photo.format) if photo else None
        if data is None:
            raise RequestError("not-found", "no such photo in this job", job_id=job_id, photo=index)
        return Response(data, media_type=MEDIA_TYPES[photo.format])

    @api.get("/v1/jobs/{job_id}/result.zip", response_class=Response,
             responses={200: {"content": {"application/zip": {}}}, **problems.responses(*JOB_PROBLEMS, "not-finished")})
    async def job_zip(self, job_id: str, request: Request) -> Response:
        await self._finished(request, job_id)
        result = JobResult.model_validate_json(await asyncio.to_thread(self.store.result, job_id))
        # a sync iterator: Starlette runs it in a worker thread, store reads included, one photo at a time
        return StreamingResponse(result_zip(result, lambda i, fmt: self.store.photo(job_id, i, fmt)),
                                 media_type="application/zip",
                                 headers={"Content-Disposition": f'attachment; filename="capray-{job_id}.zip"'})

    @api.post("/v1/protect:sync", response_model=JobResult, openapi_extra=BODY_DOC,
              responses=problems.responses(*SUBMIT_PROBLEMS, "invalid-input", "timed-out", "internal"))
    async def protect_sync(self, request: Request) -> JobResult:
        owner = self._caller(request, "protect")
        with contextlib.ExitStack() as in_progress:
            async with self._admitted(request, owner) as (sub, cfg, decoded, held):
                self.sync_in_flight += 1  # from here on it counts as a pending job, and as one of the caller's
                in_progress.enter_context(self.key_limits.take(owner))
            try:
                protected, record = await asyncio.wait_for(
                    self._protect([d.rgb for d in decoded], cfg, sub.identity, None, [d.rgb for d in held]),
                    timeout=self.config.serve.job_timeout_s)
            except TimeoutError:
                raise RequestError("timed-out", errors.timed_out(self.config.serve.job_timeout_s)) from None
            except Exception as exc:  # noqa: BLE001 - a short, stable message; the detail goes to the log
                message = errors.public_error(exc)
                slug = "server-busy" if message == errors.BUSY else \
                    "invalid-input" if message.startswith("invalid input") else "internal"
                raise RequestError(slug, message,
                                   headers={"Retry-After": "30"} if slug == "server-busy" else None) from None
            finally:
                self.sync_in_flight -= 1
        files, result = await asyncio.to_thread(build_result, sub.names, decoded, protected, record, cfg)
        for photo, data in zip(result.photos, files):
            photo.png = base64.b64encode(data).decode("ascii")
        return result


# -- building the application ---------------------------------------------------------------------

class ServeArgs(BaseModel):
    """What the Serve YAML's `args:` holds: where the capray config comes from (Serve validates it)."""

    model_config = ConfigDict(extra="forbid")

    config_path: str | None = Field(None, description="capray YAML/JSON config file on the cluster")
    preset: str | None = Field(None, description="'smoke', 'paper', 'robust', or several joined by ','")
    overrides: dict[str, Any] = Field(default_factory=dict,
                                      description="nested overrides, e.g. {serve: {max_replicas: 8}}")

    def load(self) -> CaprayConfig:
        return load_config(self.config_path, preset=self.preset, overrides=self.overrides)


def protector_options(s: ServeConfig) -> dict[str, Any]:
    return {
        "max_ongoing_requests": s.max_ongoing_requests,
        "max_queued_requests": s.max_queued_requests,
        "graceful_shutdown_timeout_s": s.graceful_shutdown_timeout_s,
        "autoscaling_config": {
            "min_replicas": s.min_replicas, "max_replicas": s.max_replicas,
            "target_ongoing_requests": s.target_ongoing_requests,
            "upscale_delay_s": s.upscale_delay_s, "downscale_delay_s": s.downscale_delay_s,
        },
        "ray_actor_options": {"num_cpus": s.cpus_per_replica, "num_gpus": s.gpus_per_replica},
    }


def ingress_options(s: ServeConfig) -> dict[str, Any]:
    # stateless (jobs live in serve.store): several replicas, none a single point of failure
    return {"num_replicas": s.ingress_replicas, "max_ongoing_requests": 1000,
            "ray_actor_options": {"num_cpus": s.ingress_cpus}}


def scoring_pool_options(sh: ShardingConfig) -> dict[str, Any]:
    # bookkeeping only (the scoring actors it starts request sharding.gpus_per_actor); one replica owns them
    return {"num_replicas": 1, "max_ongoing_requests": 1000, "ray_actor_options": {"num_cpus": 0}}


def app_from_config(cfg: CaprayConfig, listen_host: str | None = None) -> serve.Application:
    """The app for this config; `listen_host` is the HTTP address (the exposure check refuses keyless public ones)."""
    config = cfg.model_dump(mode="json")
    pool = None
    if cfg.sharding.mode != "off":
        pool = ScoringPoolDeployment.options(**scoring_pool_options(cfg.sharding)).bind(
            cfg.model.model_dump_json(), cfg.sharding.model_dump_json())
    protector = ProtectorDeployment.options(**protector_options(cfg.serve)).bind(config, pool)
    return Ingress.options(**ingress_options(cfg.serve)).bind(protector, config, listen_host or cfg.serve.host)


def build_app(args: ServeArgs) -> serve.Application:
    """Entry point for `serve run/deploy` and KubeRay's serveConfigV2 (`import_path: capray.serve.app:build_app`)."""
    if isinstance(args, dict):  # called directly rather than by Serve's typed-args loader
        args = ServeArgs.model_validate(args)
    return app_from_config(args.load(), listen_host=CLUSTER_HOST)


def deploy_config(args: ServeArgs, *, route_prefix: str = "/", port: int | None = None) -> dict[str, Any]:
    """The Serve config (ServeDeploySchema) for these args: the file behind `serve deploy` and RayService."""
    cfg = args.load()
    s = cfg.serve
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": CLUSTER_HOST, "port": port or s.port, "request_timeout_s": s.request_timeout_s},
        "applications": [{
            "name": APP_NAME, "route_prefix": route_prefix, "import_path": IMPORT_PATH,
            "args": args.model_dump(exclude_defaults=True),
            "deployments": [{"name": "Protector", **protector_options(s)}, {"name": "Ingress", **ingress_options(s)}]
            + ([{"name": "ScoringPool", **scoring_pool_options(cfg.sharding)}] if cfg.sharding.mode != "off" else []),
        }],
    }


def serve_config_problems(raw: dict[str, Any]) -> list[str]:
    """What is wrong with a Serve config that is meant to run this app (empty when nothing is).

    Serve's own schema silently ignores unknown keys and does not deep-check `autoscaling_config`, so
    this also checks every key by name, validates autoscaling, resolves the import path and requires
    the deployment options to be exactly what the capray `serve:` settings in `args` give.
    """
    import importlib

    from pydantic import ValidationError
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import DeploymentSchema, ServeApplicationSchema, ServeDeploySchema

    problems: list[str] = []
    try:
        ServeDeploySchema.model_validate(raw)
    except ValidationError as exc:
        return [f"not a Serve config: {exc}"]
    actor_keys = {"num_cpus", "num_gpus", "memory", "resources", "accelerator_type", "runtime_env", "label_selector"}

    def unknown(where: str, keys: Any, known: Any) -> None:
        extra = sorted(set(keys) - set(known))
        if extra:
            problems.append(f"{where}: unknown keys {extra}")

    unknown("top level", raw, ServeDeploySchema.model_fields)
    unknown("http_options", raw.get("http_options", {}),
            {"host", "port", "request_timeout_s", "keep_alive_timeout_s", "root_path"})
    for app in raw.get("applications", []):
        unknown(f"application {app.get('name')}", app, ServeApplicationSchema.model_fields)
        for dep in app.get("deployments", []):
            where = f"deployment {dep.get('name')}"
            unknown(where, dep, DeploymentSchema.model_fields)
            unknown(f"{where}.ray_actor_options", dep.get("ray_actor_options", {}), actor_keys)
            if "autoscaling_config" in dep:
                unknown(f"{where}.autoscaling_config", dep["autoscaling_config"], AutoscalingConfig.model_fields)
                try:
                    AutoscalingConfig.model_validate(dep["autoscaling_config"])
                except ValidationError as exc:
                    problems.append(f"{where}.autoscaling_config: {exc}")
        module, _, attr = app.get("import_path", "").partition(":")
        try:
            if not callable(getattr(importlib.import_module(module), attr)):
                raise AttributeError(attr)
        except (ImportError, AttributeError, ValueError) as exc:
            problems.append(f"application {app.get('name')}: import_path {app.get('import_path')!r}: {exc}")
            continue
        if app["import_path"] != IMPORT_PATH:
            continue
        try:
            expected = deploy_config(ServeArgs.model_validate(app.get("args", {})),
                                     route_prefix=app.get("route_prefix", "/"))["applications"][0]
        except (ValidationError, ValueError, OSError) as exc:
            problems.append(f"application {app.get('name')}: args do not load a capray config: {exc}")
            continue
        if app.get("deployments") != expected["deployments"]:
            problems.append(f"application {app.get('name')}: deployment options differ from what its capray "
                            f"serve settings give; regenerate with `capray serve --print-config`")
    return problems
