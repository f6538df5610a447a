"""The Ray Serve application: a CPU FastAPI `Ingress` in front of an autoscaling GPU `Protector`.

* `Protector` loads the models once per replica and runs THE engine call through
  `capray.attack.api.protect_arrays` — the same function the batch job's actors use, so a
  group protected online or in bulk with the same config, seed and identity gets the same pixels.
* `Ingress` validates and decodes requests (bad input is refused before any GPU time is spent),
  keeps submitted jobs for polling, and encodes results as lossless PNG.

API (JSON):
  POST /v1/protect        {photos: [{data: base64, name?}], identity?, config?} → 202 {job_id, status_url}
  GET  /v1/jobs/{job_id}  → {status: pending|done|failed, result?, error?}
  POST /v1/protect:sync   same body → 200 result (for small requests: the HTTP timeout applies)
  GET  /v1/healthz        → {"status": "ok"}

Autoscaling and limits come from `ServeConfig` (`serve:` in the capray config); `deploy_config`
renders the Serve YAML for `serve deploy` / a KubeRay RayService from the same settings.
"""

# no `from __future__ import annotations`: FastAPI (through serve.ingress) needs real annotations

import asyncio
import base64
import threading
from typing import Any, Literal

from fastapi import FastAPI, HTTPException, Request
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve.handle import DeploymentHandle

from capray.attack.api import ProtectionRecord
from capray.config import CaprayConfig, ServeConfig, load_config
from capray.serve.jobs import JobTable
from capray.serve.requests import RequestError, decode_photos, effective_config
from capray.serve.schemas import JobAccepted, JobStatus, PhotoOut, ProtectRequest, ProtectResult

APP_NAME = "capray"
IMPORT_PATH = "capray.serve.app:build_app"

api = FastAPI(title="capray", version="1", description="Protect a person's photos against DreamBooth "
              "personalization (CAP: group-aware adversarial perturbations).")


# Helpers come before the deployments: `@serve.deployment` serializes the class when the decorator runs,
# so module globals defined after it would be missing in the replicas.

def _result(body: ProtectRequest, photos: list[Any], protected: list[Any], record: ProtectionRecord,
            cfg: CaprayConfig) -> ProtectResult:
    """Engine output → response: lossless PNGs (alpha re-attached unchanged) and the run record."""
    from capray.io.images import encode_png

    out = []
    for i, (src, decoded, rgb) in enumerate(zip(body.photos, photos, protected)):
        png = encode_png(rgb, decoded.alpha)
        out.append(PhotoOut(name=src.name, png=base64.b64encode(png).decode("ascii"), width=rgb.shape[1],
                            height=rgb.shape[0], linf_255=record.linf_255[i], psnr=record.psnr[i],
                            ssim=record.ssim[i], notes=list(decoded.notes)))
    return ProtectResult(**record.model_dump(), identity=body.identity, photos=out, eps=cfg.attack.eps,
                         eps_255=cfg.attack.eps * 127.5)


@serve.deployment(name="Protector")
class Protector:
    """One GPU (or CPU) replica: models resident, one group at a time through the engine."""

    def __init__(self, config: dict[str, Any]):
        from capray.attack.engine import load_models

        cfg = CaprayConfig.model_validate(config)
        self.model_config = cfg.model
        self.models = load_models(cfg.model)
        # One group at a time on the device: a second ongoing request waits here (Serve still counts it,
        # so the autoscaler sees the load) instead of doubling GPU memory and sharing the models across threads.
        self.gpu_lock = threading.Lock()

    def protect(self, rgbs: list[Any], config: dict[str, Any], identity: str) -> tuple[list[Any], ProtectionRecord]:
        from capray.attack.api import protect_arrays

        cfg = CaprayConfig.model_validate(config)
        if cfg.model != self.model_config:
            raise ValueError("this replica serves a different model configuration")
        with self.gpu_lock:
            return protect_arrays(rgbs, cfg, identity, self.models)


def _describe(exc: BaseException) -> str:
    from ray.serve.exceptions import BackPressureError

    if isinstance(exc, BackPressureError):
        return "server busy: too many queued requests, retry later"
    cause = getattr(exc, "cause", None) or exc  # a RayTaskError carries the replica's exception
    return f"{type(cause).__name__}: {cause}"


@serve.deployment(name="Ingress")
@serve.ingress(api)
class Ingress:
    def __init__(self, protector: DeploymentHandle, config: dict[str, Any]):
        from ray.serve.metrics import Counter

        self.protector = protector
        self.config = CaprayConfig.model_validate(config)
        s = self.config.serve
        self.jobs = JobTable(s.max_finished_jobs, s.job_ttl_s)
        # more pending jobs than the Protectors can run or queue would only fail later as "busy"
        self.capacity = s.max_replicas * s.max_ongoing_requests + max(s.max_queued_requests, 0)
        self._tasks: set[asyncio.Task] = set()
        self.finished = Counter("capray_serve_groups_total", description="protection requests finished, by outcome",
                                tag_keys=("outcome",))

    async def _prepare(self, body: ProtectRequest) -> tuple[list[Any], CaprayConfig]:
        try:
            cfg = effective_config(self.config, body.config)
            photos = await asyncio.to_thread(decode_photos, body.photos, self.config.serve)
        except RequestError as exc:
            raise HTTPException(exc.status, detail=exc.detail) from None
        return photos, cfg

    async def _protect(self, body: ProtectRequest, photos: list[Any], cfg: CaprayConfig) -> ProtectResult:
        protected, record = await self.protector.protect.remote([p.rgb for p in photos], cfg.model_dump(mode="json"),
                                                                body.identity)
        return await asyncio.to_thread(_result, body, photos, protected, record, cfg)

    @api.get("/v1/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.post("/v1/protect", status_code=202, response_model=JobAccepted)
    async def submit(self, body: ProtectRequest, request: Request) -> JobAccepted:
        photos, cfg = await self._prepare(body)
        if self.jobs.pending() >= self.capacity:
            raise HTTPException(503, detail={"error": "server busy: too many pending jobs, retry later"},
                                headers={"Retry-After": "30"})
        job = self.jobs.create()
        task = asyncio.create_task(self._run(job.job_id, body, photos, cfg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return JobAccepted(job_id=job.job_id, status="pending",
                           status_url=str(request.url_for("job_status", job_id=job.job_id)))

    async def _run(self, job_id: str, body: ProtectRequest, photos: list[Any], cfg: CaprayConfig) -> None:
        try:
            result = await self._protect(body, photos, cfg)
        except Exception as exc:  # the job records why; the ingress keeps serving
            self.jobs.fail(job_id, _describe(exc))
            self.finished.inc(tags={"outcome": "failed"})
        else:
            self.jobs.finish(job_id, result)
            self.finished.inc(tags={"outcome": "ok"})

    @api.get("/v1/jobs/{job_id}", name="job_status", response_model=JobStatus)
    async def job_status(self, job_id: str) -> JobStatus:
        job = self.jobs.get(job_id)
        if job is None:
            raise HTTPException(404, detail={"error": f"no job {job_id!r} (unknown, or its result has expired)"})
        return JobStatus(job_id=job.job_id, status=job.status, created_at=job.created_at,
                         finished_at=job.finished_at, error=job.error, result=job.result)

    @api.post("/v1/protect:sync", response_model=ProtectResult)
    async def protect_sync(self, body: ProtectRequest) -> ProtectResult:
        from ray.serve.exceptions import BackPressureError

        photos, cfg = await self._prepare(body)
        try:
            result = await self._protect(body, photos, cfg)
        except BackPressureError:
            self.finished.inc(tags={"outcome": "failed"})
            raise HTTPException(503, detail={"error": _describe(BackPressureError())},
                                headers={"Retry-After": "30"}) from None
        except Exception as exc:
            self.finished.inc(tags={"outcome": "failed"})
            status = 422 if isinstance(exc, ValueError) else 500
            raise HTTPException(status, detail={"error": _describe(exc)}) from None
        self.finished.inc(tags={"outcome": "ok"})
        return result


# -- building the application ---------------------------------------------------------------------

class ServeArgs(BaseModel):
    """What the Serve YAML's `args:` holds: where the capray config comes from (Serve validates it)."""

    model_config = ConfigDict(extra="forbid")

    config_path: str | None = Field(None, description="capray YAML/JSON config file on the cluster")
    preset: Literal["smoke", "paper"] | None = None
    overrides: dict[str, Any] = Field(default_factory=dict, description="nested overrides, e.g. {serve: {max_replicas: 8}}")

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
    # one replica: the job table lives in it (see jobs.py); it only decodes, forwards and encodes
    return {"num_replicas": 1, "max_ongoing_requests": 1000, "ray_actor_options": {"num_cpus": s.ingress_cpus}}


def app_from_config(cfg: CaprayConfig) -> serve.Application:
    config = cfg.model_dump(mode="json")
    protector = Protector.options(**protector_options(cfg.serve)).bind(config)
    return Ingress.options(**ingress_options(cfg.serve)).bind(protector, config)


def build_app(args: ServeArgs) -> serve.Application:
    """Entry point for `serve run/deploy` and KubeRay's serveConfigV2 (`import_path: capray.serve.app:build_app`)."""
    if isinstance(args, dict):  # called directly rather than by Serve's typed-args loader
        args = ServeArgs.model_validate(args)
    return app_from_config(args.load())


def deploy_config(args: ServeArgs, *, route_prefix: str = "/", port: int | None = None) -> dict[str, Any]:
    """The Serve config (ServeDeploySchema) for these args: the file behind `serve deploy` and RayService."""
    cfg = args.load()
    s = cfg.serve
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": "0.0.0.0", "port": port or s.port, "request_timeout_s": s.request_timeout_s},
        "applications": [{
            "name": APP_NAME, "route_prefix": route_prefix, "import_path": IMPORT_PATH,
            "args": args.model_dump(exclude_defaults=True),
            "deployments": [{"name": "Protector", **protector_options(s)}, {"name": "Ingress", **ingress_options(s)}],
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
