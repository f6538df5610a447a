"""The online endpoint: request validation, the job table, the Serve YAML, and the real app over HTTP.

The HTTP tests run `serve.run` on 127.0.0.1 inside the shared Ray cluster and talk to it with httpx:
protected PNGs keep their size and the L∞ budget, the same request gives the same bytes, and those
bytes equal the engine called directly in this process.
"""

from __future__ import annotations

import base64
import io
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SERVE_YAML = ROOT / "deploy" / "serve_config.yaml"


def _png(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _photo(h: int, w: int, seed: int) -> np.ndarray:
    """A smooth random RGB photo (uint8)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    low = rng.integers(30, 225, size=(max(h // 8, 2), max(w // 8, 2), 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(low).resize((w, h), Image.BILINEAR))


PHOTOS = [_photo(72, 96, 1), _photo(80, 64, 2)]


def _body(photos=PHOTOS, **extra):
    return {"identity": "alice", "photos": [{"name": f"p{i}.png", "data": base64.b64encode(_png(a)).decode()}
                                            for i, a in enumerate(photos)], **extra}


def _decode_png(b64: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


# -- request handling without Ray ----------------------------------------------------------------------

def test_overrides_may_tune_the_attack_but_not_what_the_server_owns():
    from capray.config import load_config
    from capray.serve.requests import RequestError, effective_config

    server = load_config(preset="smoke")
    cfg = effective_config(server, {"seed": 7, "attack": {"eps": 0.03, "alpha": 0.003}, "cap": {"ratio_max": 5}})
    assert (cfg.seed, cfg.attack.eps, cfg.cap.ratio_max, cfg.model) == (7, 0.03, 5, server.model)
    refused = [
        ({"model": {"sd": "/etc"}}, "may override only"),
        ({"serve": {"max_photos": 1000}}, "may override only"),
        ({"attack": {"fsmg_model": "/tmp/x"}}, "config.attack.fsmg_model"),
        ({"attack": {"surrogate": {"class_prompt": "a dog"}}}, "class_prompt"),
        ({"attack": {"epz": 0.1}}, "invalid config overrides"),
        ({"attack": {"eps": "big"}}, "invalid config overrides"),
        ({"attack": {"alpha": 0.5}}, "invalid config overrides"),  # alpha > eps
        ({"cap": {"ratio_max": 11}}, "cap.ratio_max = 11 > 10"),
        ({"attack": {"outer_loops": 1000}}, "PGD steps requested"),
    ]
    for overrides, message in refused:
        with pytest.raises(RequestError) as info:
            effective_config(server, overrides)
        assert info.value.status == 422 and message in str(info.value.detail), (overrides, info.value.detail)


def test_photo_errors_name_the_photo_and_the_reason():
    from capray.config import ServeConfig
    from capray.serve.requests import RequestError, decode_photos
    from capray.serve.schemas import PhotoIn

    limits = ServeConfig(max_photos=3, max_photo_bytes=50_000, max_image_pixels=200 * 200)
    good = PhotoIn(data=base64.b64encode(_png(PHOTOS[0])).decode(), name="a.png")
    decoded = decode_photos([good, PhotoIn(data="data:image/png;base64," + good.data)], limits)
    assert [d.rgb.shape for d in decoded] == [(72, 96, 3)] * 2 and np.array_equal(decoded[0].rgb, PHOTOS[0])
    cases = [
        ([good, PhotoIn(data=base64.b64encode(b"not an image").decode(), name="b")], 422, 1, "not a recognised"),
        ([PhotoIn(data="***")], 422, 0, "base64"),
        ([PhotoIn(data=base64.b64encode(_png(np.zeros((300, 300, 3), np.uint8))).decode())], 422, 0, "pixels"),
        ([PhotoIn(data="A" * 80_000)], 413, 0, "larger than"),
        ([good] * 4, 413, None, "at most 3"),
    ]
    for photos, status, index, message in cases:
        with pytest.raises(RequestError) as info:
            decode_photos(photos, limits)
        assert info.value.status == status and message in info.value.detail["error"], info.value.detail
        assert info.value.detail.get("photo") == index


def test_job_table_keeps_pending_jobs_and_expires_old_results():
    from capray.serve.jobs import JobTable

    now = [0.0]
    table = JobTable(max_finished=2, ttl_s=100, clock=lambda: now[0])
    jobs = [table.create() for _ in range(4)]
    assert table.pending() == 4 and len({j.job_id for j in jobs}) == 4
    for j in jobs[:3]:
        now[0] += 1
        table.finish(j.job_id, {"n": j.job_id})
    assert table.get(jobs[0].job_id) is None  # over max_finished: the oldest result went first
    assert table.get(jobs[1].job_id).status == "done" and table.get(jobs[3].job_id).status == "pending"
    table.fail(jobs[3].job_id, "boom")
    now[0] += 1000  # past the TTL: every finished result is gone
    assert table.get(jobs[3].job_id) is None and table.get(jobs[2].job_id) is None and table.pending() == 0


def test_serve_yaml_is_a_valid_serve_config_that_matches_the_code():
    from ray.serve.schema import ServeDeploySchema

    from capray.serve.app import ServeArgs, deploy_config, serve_config_problems

    raw = yaml.safe_load(SERVE_YAML.read_text())
    ServeDeploySchema.model_validate(raw)
    assert serve_config_problems(raw) == []
    (app,) = raw["applications"]
    assert raw == deploy_config(ServeArgs.model_validate(app["args"]), route_prefix=app["route_prefix"],
                                port=raw["http_options"]["port"])
    protector = next(d for d in app["deployments"] if d["name"] == "Protector")
    assert protector["ray_actor_options"]["num_gpus"] == 1
    assert protector["max_ongoing_requests"] > protector["autoscaling_config"]["target_ongoing_requests"]


def test_serve_config_check_catches_typos_bad_autoscaling_and_drift():
    """Each defect is one Serve's own schema lets through."""
    import copy

    from ray.serve.schema import ServeDeploySchema

    from capray.serve.app import serve_config_problems

    good = yaml.safe_load(SERVE_YAML.read_text())
    protector = 0 if good["applications"][0]["deployments"][0]["name"] == "Protector" else 1
    defects = {
        "unknown keys ['max_ongoing_request']": lambda d: d.update(max_ongoing_request=3),
        "autoscaling_config: ": lambda d: d["autoscaling_config"].update(min_replicas=9),
        "autoscaling_config: unknown keys ['max_replica']": lambda d: d["autoscaling_config"].update(max_replica=2),
        "ray_actor_options: unknown keys ['num_gpu']": lambda d: d["ray_actor_options"].update(num_gpu=1),
        "differ from what its capray serve settings give": lambda d: d.update(max_queued_requests=99),
    }
    for message, damage in defects.items():
        raw = copy.deepcopy(good)
        damage(raw["applications"][0]["deployments"][protector])
        ServeDeploySchema.model_validate(raw)  # Serve accepts it …
        problems = serve_config_problems(raw)  # … the check does not
        assert any(message in p for p in problems), (message, problems)
    raw = copy.deepcopy(good)
    raw["applications"][0]["import_path"] = "capray.serve.app:no_such_builder"
    assert any("import_path" in p for p in serve_config_problems(raw))


def test_capray_serve_print_config_regenerates_the_committed_yaml(capsys):
    """The header of deploy/serve_config.yaml names the command that produced it; it still does."""
    import argparse

    from capray.serve import command

    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    assert command.run(parser.parse_args(["--print-config", "--preset", "paper", "--set", "serve.min_replicas=1"])) == 0
    assert yaml.safe_load(capsys.readouterr().out) == yaml.safe_load(SERVE_YAML.read_text())


# -- the application over HTTP --------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(ray_cluster, tiny_model_dir):
    from ray import serve

    from capray.config import load_config
    from capray.serve.app import app_from_config

    cfg = load_config(preset="smoke", overrides={"serve": {
        "min_replicas": 1, "max_replicas": 1, "gpus_per_replica": 0, "cpus_per_replica": 1, "ingress_cpus": 0,
        "max_photos": 4}})
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(app_from_config(cfg), name="capray-test", route_prefix="/")
        yield f"http://127.0.0.1:{port}", cfg
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def client(served):
    import httpx

    with httpx.Client(base_url=served[0], timeout=300) as c:
        yield c


def _wait(client, job_id: str, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.get(f"/v1/jobs/{job_id}").json()
        if status["status"] != "pending":
            return status
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} still pending after {timeout} s")


@pytest.mark.ray
def test_sync_request_returns_same_size_pngs_within_the_budget(client, served):
    cfg = served[1]
    assert client.get("/v1/healthz").json() == {"status": "ok"}
    resp = client.post("/v1/protect:sync", json=_body())
    assert resp.status_code == 200, resp.text
    result = resp.json()
    budget = round(cfg.attack.eps * 127.5)
    assert len(result["photos"]) == 2 and result["cap_enabled"] is True
    for clean, out in zip(PHOTOS, result["photos"]):
        prot = _decode_png(out["png"])
        assert prot.shape == clean.shape and (out["height"], out["width"]) == clean.shape[:2]
        linf = int(np.abs(prot.astype(int) - clean.astype(int)).max())
        assert 0 < linf <= budget and linf == out["linf_255"]
    assert len(result["lambda_schedule"]) == cfg.attack.total_pgd_steps
    assert result["eps_255"] == pytest.approx(cfg.attack.eps * 127.5)


@pytest.mark.ray
def test_jobs_are_deterministic_and_equal_the_in_process_engine(client, served, tiny_models):
    import torch

    from capray import protect_group
    from capray.attack.metrics import from_uint8, to_uint8
    from capray.io.images import encode_png

    accepted = [client.post("/v1/protect", json=_body()) for _ in range(2)]
    assert [r.status_code for r in accepted] == [202, 202]
    ids = [r.json()["job_id"] for r in accepted]
    assert ids[0] != ids[1] and accepted[0].json()["status_url"].endswith(f"/v1/jobs/{ids[0]}")
    done = [_wait(client, i) for i in ids]
    assert [d["status"] for d in done] == ["done", "done"], [d.get("error") for d in done]
    first, second = ([p["png"] for p in d["result"]["photos"]] for d in done)
    assert first == second

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the one-CPU replica
    try:
        local = protect_group([from_uint8(a) for a in PHOTOS], served[1], identity="alice", models=tiny_models)
    finally:
        torch.set_num_threads(threads)
    assert [base64.b64decode(p) for p in first] == [encode_png(to_uint8(t)) for t in local.images]
    assert done[0]["result"]["lambda_schedule"] == local.lambda_schedule
    assert done[0]["result"]["config_hash"] == served[1].config_hash()


@pytest.mark.ray
def test_bad_requests_are_refused_with_clear_4xx(client):
    bad_image = _body()
    bad_image["photos"][1]["data"] = base64.b64encode(b"GIF89a but not really").decode()
    resp = client.post("/v1/protect", json=bad_image)
    assert resp.status_code == 422 and resp.json()["detail"]["photo"] == 1, resp.text
    assert client.post("/v1/protect:sync", json=bad_image).status_code == 422
    assert client.post("/v1/protect", json=_body(PHOTOS * 3)).status_code == 413  # 6 > max_photos = 4
    resp = client.post("/v1/protect", json=_body(config={"model": {"sd": "/etc"}}))
    assert resp.status_code == 422 and "may override only" in resp.json()["detail"]["error"]
    assert client.post("/v1/protect", json=_body(config={"attack": {"eps": -1}})).status_code == 422
    assert client.post("/v1/protect", json={"photos": []}).status_code == 422  # pydantic: at least one
    assert client.post("/v1/protect", json={**_body(), "colour": "red"}).status_code == 422
    assert client.get("/v1/jobs/0123456789abcdef").status_code == 404
