"""The online endpoint over real HTTP on 127.0.0.1: auth, limits, durable jobs, downloads, restarts.

One Serve app (two ingress replicas, one CPU Protector, tiny model, a local job store, API keys in a
file) is shared by the module; the restart test runs last and leaves a restarted app behind.
"""

from __future__ import annotations

import base64
import io
import json
import os
import select
import socket
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import PROXY_MAX_REQUEST_BYTES
from test_serve import PHOTOS, _photo, _png, _png_array

pytestmark = pytest.mark.ray

APP = "capray-test"
ALICE, BOB = "alice-key-0123456789", "bob-key-9876543210"
READER = "reader-key-5555555555"  # a known key with the read right only
PROBLEM = "application/problem+json"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _auth(key: str = ALICE) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _json_body(photos=PHOTOS, **extra) -> dict:
    return {"identity": "alice", "photos": [{"name": f"p{i}.png", "data": base64.b64encode(_png(a)).decode()}
                                            for i, a in enumerate(photos)], **extra}


def _multipart(photos=PHOTOS, options: dict | None = None) -> dict:
    files = [("photo", (f"p{i}.png", _png(a), "image/png")) for i, a in enumerate(photos)]
    if options is not None:
        files.append(("options", (None, json.dumps(options), "application/json")))
    return {"files": files}


@pytest.fixture(scope="module")
def served(ray_cluster, tiny_model_dir, tmp_path_factory):
    from ray import serve

    from capray.config import load_config
    from capray.serve.app import app_from_config

    base = tmp_path_factory.mktemp("serve")
    keys_file = base / "keys"
    keys_file.write_text(f"{ALICE}\n{BOB}\n{READER} read\n")
    cfg = load_config(preset="smoke", overrides={"serve": {
        "min_replicas": 1, "max_replicas": 1, "gpus_per_replica": 0, "cpus_per_replica": 1, "ingress_cpus": 0,
        "ingress_replicas": 2, "max_queued_requests": 2, "max_photos": 4, "max_request_bytes": PROXY_MAX_REQUEST_BYTES,
        "max_request_pixels": 40_000, "store": str(base / "store"), "api_keys_file": str(keys_file),
        "job_lease_s": 3}})
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(app_from_config(cfg), name=APP, route_prefix="/")
        yield {"url": f"http://127.0.0.1:{port}", "port": port, "cfg": cfg, "base": base,
               "restart": lambda: serve.run(app_from_config(cfg), name=APP, route_prefix="/")}
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def client(served):
    import httpx

    with httpx.Client(base_url=served["url"], timeout=300) as c:
        yield c


def _api(client, key: str = ALICE):
    """`capray.client` on the test server, as a platform would call it."""
    from capray.client import Client

    return Client(str(client.base_url), api_key=key, timeout=300, max_wait_s=300)


def _wait(client, job_id: str, key: str = ALICE) -> dict:
    """The job's final status (ok or failed), polled by the client (Retry-After, bounded)."""
    from capray.client import JobFailed

    with _api(client, key) as api:
        try:
            return api.wait(job_id)
        except JobFailed as failed:
            return failed.status


def _pngs(client, job_id: str, n: int, key: str = ALICE) -> list[bytes]:
    with _api(client, key) as api:
        photos = api.download(job_id)
    assert len(photos) == n and all(p.format == "png" and p.data.startswith(b"\x89PNG") for p in photos)
    return [p.data for p in photos]


@pytest.fixture(scope="module")
def finished(client):
    """One JSON job (raw HTTP) and one multipart job (`capray.client`) of the same photos, both finished."""
    json_job = client.post("/v1/protect", json=_json_body(), headers=_auth())
    assert json_job.status_code == 202, json_job.text
    with _api(client) as api:
        form_job = api.submit([(f"p{i}.png", _png(a)) for i, a in enumerate(PHOTOS)], identity="alice")
    ids = [json_job.json()["job_id"], form_job.job_id]
    done = [_wait(client, i) for i in ids]
    assert [d["status"] for d in done] == ["ok", "ok"], [d.get("error") for d in done]
    return {"ids": ids, "status": done, "pngs": [_pngs(client, i, len(PHOTOS)) for i in ids]}


# -- authentication -------------------------------------------------------------------------------------

def _problem(resp, status: int, slug: str) -> dict:
    """The RFC 9457 body of a refusal, checked to be one: its media type, its stable type, its status."""
    assert resp.status_code == status and resp.headers["content-type"] == PROBLEM, (slug, resp.status_code, resp.text)
    body = resp.json()
    assert body["type"] == f"urn:capray:problem:{slug}" and body["status"] == status and body["title"], body
    return body


def test_keys_guard_every_route_but_healthz_and_the_page(client, finished):
    from capray.serve.app import openapi_document

    job = finished["ids"][0]
    assert client.get("/v1/healthz").json() == {"status": "ok"}
    assert client.get("/").status_code == 200  # the page asks for the key itself
    for path in ("/docs", "/redoc"):  # FastAPI's own pages would answer without a key: off
        _problem(client.get(path), 404, "not-found")
    routes = [("post", "/v1/protect"), ("post", "/v1/protect:sync"), ("get", "/v1/jobs"), ("get", f"/v1/jobs/{job}"),
              ("get", f"/v1/jobs/{job}/photos/0"), ("get", f"/v1/jobs/{job}/result.zip"),
              ("delete", f"/v1/jobs/{job}"), ("get", "/openapi.json")]
    for method, path in routes:  # RFC 6750: 401 for no key (a bare challenge) and for an unknown key (invalid_token)
        missing = client.request(method, path, content=b"x" * 100_000)  # refused before the body is read
        _problem(missing, 401, "unauthorized")
        assert missing.headers["www-authenticate"] == 'Bearer realm="capray"', path
        wrong = client.request(method, path, headers=_auth("not-a-key"))
        assert "not accepted" in _problem(wrong, 401, "invalid-key")["detail"], path
        assert 'error="invalid_token"' in wrong.headers["www-authenticate"], path
    assert client.get("/openapi.json", headers=_auth(READER)).json() == openapi_document()
    # 403 only where a known key lacks the right: the read-only key may list and read, not protect or delete
    _problem(client.post("/v1/protect", json=_json_body(), headers=_auth(READER)), 403, "forbidden")
    _problem(client.delete(f"/v1/jobs/{job}", headers=_auth(READER)), 403, "forbidden")
    assert client.get("/v1/jobs", headers=_auth(READER)).json() == {"jobs": []}
    # a job belongs to the key that created it: another valid key cannot tell it from an unknown one
    for path in [f"/v1/jobs/{job}", f"/v1/jobs/{job}/photos/0", f"/v1/jobs/{job}/result.zip"]:
        theirs = client.get(path, headers=_auth(BOB))
        unknown = client.get(path.replace(job, "0" * 32), headers=_auth(BOB))
        assert _problem(theirs, 404, "not-found")["detail"] == _problem(unknown, 404, "not-found")["detail"]
        assert client.get(path, headers=_auth(ALICE)).status_code == 200
    _problem(client.delete(f"/v1/jobs/{job}", headers=_auth(BOB)), 404, "not-found")
    assert client.get(f"/v1/jobs/{job}", headers=_auth(ALICE)).json()["status"] == "ok"  # still there for alice


# -- REST conventions -----------------------------------------------------------------------------------

def _store_files(served, job_id: str) -> list[str]:
    """Every file in the job store that names `job_id` (its folder, markers, records)."""
    root = Path(served["cfg"].serve.store)
    return [str(p.relative_to(root)) for p in root.rglob("*")
            if p.is_file() and (job_id in str(p) or job_id.encode() in p.read_bytes())]


def test_a_retried_submit_gets_the_same_job_and_a_deleted_job_leaves_nothing(client, served):
    """Idempotency-Key per caller; DELETE of a running and of a finished job: every file of it is gone at once."""
    body, key = _json_body(config={"seed": 11}), {"Idempotency-Key": "upload-7f3a"}
    first = client.post("/v1/protect", json=body, headers={**_auth(), **key})
    assert first.status_code == 202, first.text
    job = first.json()["job_id"]
    assert first.headers["location"] == first.json()["status_url"] and first.headers["location"].endswith(job)
    assert int(first.headers["retry-after"]) > 0
    again = client.post("/v1/protect", json=body, headers={**_auth(), **key})
    assert again.status_code == 202 and again.json()["job_id"] == job and again.headers["idempotent-replayed"] == "true"
    as_form = client.post("/v1/protect", **_multipart(options={"identity": "alice", "config": {"seed": 11}}),
                          headers={**_auth(), **key})  # the same request in the other body form: the same job
    assert as_form.status_code == 202 and as_form.json()["job_id"] == job
    other = client.post("/v1/protect", json=_json_body(config={"seed": 12}), headers={**_auth(), **key})
    assert "another request" in _problem(other, 422, "idempotency-key-reused")["detail"]
    bobs = client.post("/v1/protect", json=body, headers={**_auth(BOB), **key})  # keys are scoped to the caller
    assert bobs.status_code == 202 and bobs.json()["job_id"] != job
    status = client.get(f"/v1/jobs/{job}", headers=_auth())
    assert ("retry-after" in status.headers) == (status.json()["status"] == "pending")
    assert status.json()["created_at"].endswith("Z")
    assert _store_files(served, job), "the job is not in the store"

    deleted = client.delete(f"/v1/jobs/{job}", headers=_auth())  # running (or queued): cancelled, removed
    assert deleted.status_code == 204 and not deleted.content
    assert _store_files(served, job) == []
    _problem(client.get(f"/v1/jobs/{job}", headers=_auth()), 404, "not-found")
    _problem(client.delete(f"/v1/jobs/{job}", headers=_auth()), 404, "not-found")
    bob_done = _wait(client, bobs.json()["job_id"], BOB)  # the one Protector was free for it: alice's run stopped
    assert bob_done["status"] == "ok" and bob_done["finished_at"].endswith("Z")
    assert _store_files(served, job) == [], "the deleted job's runner wrote after the delete"
    finished = _store_files(served, bob_done["job_id"])
    assert any(f.endswith("photos/0.png") for f in finished) and any(f.endswith("result.json") for f in finished)
    assert client.delete(f"/v1/jobs/{bob_done['job_id']}", headers=_auth(BOB)).status_code == 204
    assert _store_files(served, bob_done["job_id"]) == []
    _problem(client.get(f"/v1/jobs/{bob_done['job_id']}/photos/0", headers=_auth(BOB)), 404, "not-found")
    renewed = client.post("/v1/protect", json=body, headers={**_auth(), **key})  # the key's job is gone: a new one
    assert renewed.status_code == 202 and renewed.json()["job_id"] != job
    assert client.delete(f"/v1/jobs/{renewed.json()['job_id']}", headers=_auth()).status_code == 204


def test_a_callers_jobs_are_listed_newest_first_page_by_page(client, finished):
    seen, url, pages = [], "/v1/jobs?limit=1", 0
    while url and pages < 50:
        page = client.get(url, headers=_auth())
        assert page.status_code == 200, page.text
        seen += page.json()["jobs"]
        cursor = page.json().get("next_cursor")
        assert (cursor is None) == ("link" not in page.headers)
        url = page.headers["link"].split(">")[0].lstrip("<") if cursor else None
        pages += 1
    ids = [j["job_id"] for j in seen]
    assert len(ids) == len(set(ids)) == pages and set(finished["ids"]) <= set(ids)
    json_job, form_job = finished["ids"]
    assert ids.index(form_job) < ids.index(json_job)  # submitted after it: listed before it
    assert [j["created_at"] for j in seen] == sorted((j["created_at"] for j in seen), reverse=True)
    mine = next(j for j in seen if j["job_id"] == json_job)
    assert mine["status"] == "ok" and mine["photos"] == len(PHOTOS) and mine["status_url"].endswith(json_job)
    assert all(j["created_at"].endswith("Z") for j in seen)
    whole = client.get("/v1/jobs?limit=100", headers=_auth()).json()
    assert [j["job_id"] for j in whole["jobs"]] == ids and "next_cursor" not in whole
    bobs = client.get("/v1/jobs?limit=100", headers=_auth(BOB)).json()["jobs"]
    assert not set(ids) & {j["job_id"] for j in bobs}
    _problem(client.get("/v1/jobs?cursor=bm90LWEtY3Vyc29y", headers=_auth()), 422, "malformed-request")
    _problem(client.get("/v1/jobs?limit=0", headers=_auth()), 422, "malformed-request")


# -- results --------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_multipart_and_json_give_the_pixels_of_capray_protect(client, served, finished, tmp_path):
    from capray.batch.command import protect

    cfg = served["cfg"]
    json_pngs, form_pngs = finished["pngs"]
    assert json_pngs == form_pngs
    src, out = tmp_path / "in", tmp_path / "out"
    (src / "alice").mkdir(parents=True)
    for i, arr in enumerate(PHOTOS):
        (src / "alice" / f"p{i}.png").write_bytes(_png(arr))
    summary = protect(str(src), str(out), cfg, show_progress=False)
    assert summary.ok == 1
    batch = [(out / "alice" / f"p{i}.png").read_bytes() for i in range(len(PHOTOS))]
    assert [_png_array(b).tolist() for b in json_pngs] == [_png_array(b).tolist() for b in batch]
    assert json_pngs == batch  # same pixels, same encoder: same bytes
    budget = round(cfg.attack.eps * 127.5)
    for clean, png in zip(PHOTOS, json_pngs):
        linf = int(np.abs(_png_array(png).astype(int) - clean.astype(int)).max())
        assert _png_array(png).shape == clean.shape and 0 < linf <= budget
    status = finished["status"][0]
    total = cfg.attack.total_pgd_steps
    assert status["progress"] == {"steps_done": total, "steps_total": total} and status["attempts"] == 1
    result = status["result"]
    assert len(result["lambda_schedule"]) == total and result["config_hash"] == cfg.config_hash()
    assert [p["url"] for p in result["photos"]] == [f"{served['url']}/v1/jobs/{finished['ids'][0]}/photos/{i}"
                                                    for i in range(len(PHOTOS))]


def test_result_zip_holds_the_same_pngs_and_a_summary(client, finished):
    job = finished["ids"][1]
    resp = client.get(f"/v1/jobs/{job}/result.zip", headers=_auth())
    assert resp.status_code == 200 and resp.headers["content-type"] == "application/zip"
    assert "content-length" not in resp.headers  # streamed entry by entry, never built whole in memory
    with zipfile.ZipFile(io.BytesIO(resp.content)) as zf:
        names = zf.namelist()
        assert names == ["00_p0.png", "01_p1.png", "summary.json"]
        assert [zf.read(n) for n in names[:2]] == finished["pngs"][1]
        summary = json.loads(zf.read("summary.json"))
    assert summary["identity"] == "alice" and [p["name"] for p in summary["photos"]] == ["p0.png", "p1.png"]
    assert client.get(f"/v1/jobs/{job}/photos/{len(PHOTOS)}", headers=_auth()).status_code == 404


def test_sync_request_returns_the_same_pixels_inline(client, finished):
    resp = client.post("/v1/protect:sync", **_multipart(options={"identity": "alice"}), headers=_auth())
    assert resp.status_code == 200, resp.text
    assert [base64.b64decode(p["png"]) for p in resp.json()["photos"]] == finished["pngs"][0]


def test_a_job_holds_an_earlier_jobs_photos_fixed_and_protects_only_the_new_one(client, served, finished):
    """Append at the endpoint: alice's new photo protected against her published ones — an earlier job's
    PNGs, by reference (`fixed_jobs`) or uploaded (`fixed`) — the same pixels either way."""
    earlier, published = finished["ids"][0], finished["pngs"][0]
    new = _photo(64, 72, 3)
    uploaded = _append_sync(client, new, published)
    with _api(client) as api:  # by reference, through the client
        by_reference = api.protect([("p2.png", new)], identity="alice", fixed_jobs=[earlier])
    assert by_reference.record["fixed_members"] == 2 and by_reference.record["cap_enabled"]
    (png,) = [p.data for p in by_reference.photos]  # only the new photo comes back
    assert uploaded == png
    linf = int(np.abs(_png_array(png).astype(int) - new.astype(int)).max())
    assert 0 < linf <= round(served["cfg"].attack.eps * 127.5)
    others = client.post("/v1/protect", json=_json_body([new], fixed_jobs=[earlier]), headers=_auth(BOB))
    _problem(others, 404, "not-found")  # another caller's job is not there for them
    too_many = client.post("/v1/protect", json=_json_body([new, new, new], fixed_jobs=[earlier]), headers=_auth())
    assert too_many.status_code == 413 and "2 fixed" in too_many.json()["detail"]


def _append_sync(client, new, published) -> bytes:
    """The protected PNG of `new`, held against `published` (uploaded as `fixed`), from the sync route."""
    resp = client.post("/v1/protect:sync", headers=_auth(), files=[
        ("photo", ("p2.png", _png(new), "image/png")),
        *[("fixed", (f"p{i}.png", png, "image/png")) for i, png in enumerate(published)],
        ("options", (None, json.dumps({"identity": "alice"}), "application/json"))])
    assert resp.status_code == 200, resp.text
    return base64.b64decode(resp.json()["photos"][0]["png"])


@pytest.mark.slow
def test_the_endpoints_append_gives_the_batch_jobs_pixels(client, served, finished, tmp_path):
    """The same person in bulk — protected, then one photo added — gets the endpoint's append pixels."""
    from capray.batch.command import protect

    new = _photo(64, 72, 3)
    png = _append_sync(client, new, finished["pngs"][0])
    src, out = tmp_path / "in", tmp_path / "out"
    (src / "alice").mkdir(parents=True)
    for i, arr in enumerate(PHOTOS):
        (src / "alice" / f"p{i}.png").write_bytes(_png(arr))
    assert protect(str(src), str(out), served["cfg"], show_progress=False).ok == 1
    (src / "alice" / "p2.png").write_bytes(_png(new))
    assert protect(str(src), str(out), served["cfg"], show_progress=False).ok == 1
    assert (out / "alice" / "p2.png").read_bytes() == png


def test_two_ingress_replicas_answer_each_others_jobs(client, served, finished):
    """Any replica answers any job: the store, not a replica's memory, holds it."""
    job = finished["ids"][0]
    seen: dict[str, dict] = {}
    for _ in range(60):
        resp = client.get(f"/v1/jobs/{job}", headers=_auth())
        seen.setdefault(resp.headers["x-capray-replica"], resp.json())
        if len(seen) == 2:
            break
    assert len(seen) == 2, "Serve routed every request to one ingress replica"
    first, second = seen.values()
    assert first == second and first["status"] == "ok"


def test_a_job_whose_runner_vanished_is_rerun_with_the_same_pixels(client, served, finished):
    """As if an ingress replica died mid-job: the job sits in the store, pending, its lease run out."""
    from capray.serve.auth import owner_id
    from capray.serve.store import JobRequest, JobState, JobStore

    cfg = served["cfg"]
    store = JobStore(cfg.serve.store)
    job_id = "ab" * 16
    now = time.time()
    request = JobRequest(job_id=job_id, owner=owner_id(ALICE), identity="alice", names=["p0.png", "p1.png"],
                         config=cfg.model_dump(mode="json"), created_at=now)
    store.create(request, [_png(a) for a in PHOTOS],
                 JobState(job_id=job_id, owner=request.owner, created_at=now, updated_at=now, holder="gone",
                          attempts=1, steps_total=cfg.attack.total_pgd_steps), cfg.serve.job_lease_s)
    status_file = Path(cfg.serve.store) / "jobs" / job_id / "status.json"
    os.utime(status_file, (now - 60, now - 60))  # its runner last renewed a minute ago (the store's clock)
    status = _wait(client, job_id)
    assert status["status"] == "ok" and status["attempts"] == 2, status
    assert _pngs(client, job_id, len(PHOTOS)) == finished["pngs"][0]


# -- limits before work ---------------------------------------------------------------------------------

def test_iphone_photos_round_trip_as_webp_with_their_colours_and_without_their_location(client):
    """A Display-P3 JPEG and a HEIC, `output.format: webp` asked per request: WebP files with the P3 profile
    whose rendered colours are the input's within the budget, capture time kept, GPS gone."""
    from photo_helpers import display_p3_icc, p3_heic, p3_jpeg, saturated_photo
    from test_photo_fidelity import EPS_255, rendered

    sources = {"IMG_1.jpg": p3_jpeg(saturated_photo(40, 48), orientation=6),
               "IMG_2.heic": p3_heic(saturated_photo(44, 40, seed=1))}
    with _api(client) as api:
        result = api.protect(list(sources.items()), identity="iphone", options={"output": {"format": "webp"}})
    assert [p.format for p in result.photos] == ["webp", "webp"]
    for photo, source in zip(result.photos, sources.values()):
        out = photo.image()
        assert out.format == "WEBP" and out.info["icc_profile"] == display_p3_icc()
        assert np.abs(rendered(photo.data) - rendered(source)).mean() <= EPS_255
        assert not out.getexif().get_ifd(0x8825) and out.getexif().get_ifd(0x8769)[0x9003] == "2024:05:01 10:00:00"
    resp = client.get(f"/v1/jobs/{result.job_id}/photos/0", headers=_auth())
    assert resp.headers["content-type"] == "image/webp" and resp.content == result.photos[0].data
    archive = client.get(f"/v1/jobs/{result.job_id}/result.zip", headers=_auth())
    with zipfile.ZipFile(io.BytesIO(archive.content)) as zf:
        assert zf.namelist() == ["00_IMG_1.webp", "01_IMG_2.webp", "summary.json"]


def test_capray_submit_saves_the_endpoints_pixels_and_deletes_the_job(client, served, finished, tmp_path,
                                                                       monkeypatch, capsys):
    """From the shell: a folder of one person's photos in, the protected files and summary.json out, the
    server's copy deleted; the pixels are those of the same request made any other way."""
    from capray.cli import main

    photos, out = tmp_path / "alice", tmp_path / "protected"
    photos.mkdir()
    for i, arr in enumerate(PHOTOS):
        (photos / f"p{i}.png").write_bytes(_png(arr))
    monkeypatch.setenv("CAPRAY_API_KEY", ALICE)
    assert main(["submit", "--url", served["url"], str(photos), str(out)]) == 0
    result = capsys.readouterr().out.strip().splitlines()[-1]
    assert result.startswith("RESULT submit job=") and "photos=2 ok=true" in result, result
    assert [(out / f"p{i}.png").read_bytes() for i in range(len(PHOTOS))] == finished["pngs"][1]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["identity"] == "alice" and summary["config_hash"] == served["cfg"].config_hash()
    job_id = result.split("job=")[1].split()[0]
    assert client.get(f"/v1/jobs/{job_id}", headers=_auth()).status_code == 404  # deleted from the server
    assert _store_files(served, job_id) == []
    monkeypatch.setenv("CAPRAY_API_KEY", "not-a-key")
    assert main(["submit", "--url", served["url"], str(photos), str(tmp_path / "refused")]) == 2
    assert "invalid-key" in capsys.readouterr().err


def test_bad_requests_are_refused_with_clear_4xx(client):
    bad_image = _json_body()
    bad_image["photos"][1]["data"] = base64.b64encode(b"\x89PNG\r\n\x1a\n but not really").decode()
    resp = client.post("/v1/protect", json=bad_image, headers=_auth())
    assert _problem(resp, 422, "invalid-photo")["photo"] == 1 and resp.json()["instance"] == "/v1/protect"
    assert client.post("/v1/protect:sync", json=bad_image, headers=_auth()).status_code == 422
    other_format = _json_body()
    other_format["photos"][1]["data"] = base64.b64encode(b"8BPS\x00\x01" + bytes(40)).decode()  # Photoshop
    for route in ("/v1/protect", "/v1/protect:sync"):
        resp = client.post(route, json=other_format, headers=_auth())
        assert "PSD files are not accepted" in _problem(resp, 415, "unsupported-format")["detail"]
    cases = [  # every refusal: problem+json with its stable type
        (dict(json=_json_body(PHOTOS * 3)), 413, "too-many-photos", "at most 4"),  # 6 photos > max_photos
        (_multipart(PHOTOS * 3), 413, "too-many-photos", "at most 4"),
        (dict(json=_json_body([_photo(150, 150, 3)] * 2)), 413, "too-many-pixels", "serve.max_request_pixels"),
        (dict(json=_json_body(config={"model": {"sd": "/etc"}})), 422, "config-not-settable", "not settable"),
        (dict(json=_json_body(config={"cap": {"search": "reference"}})), 422, "over-server-limits", "costs more"),
        (_multipart(options={"config": {"cap": {"score_draws": 99}}}), 422, "over-server-limits", "score_draws"),
        (_multipart(options={"colour": "red"}), 422, "malformed-request", "malformed request"),
        (dict(json=_json_body(config={"attack": {"eps": -1}})), 422, "invalid-config", "invalid config overrides"),
        (dict(json={"photos": []}), 422, "no-photos", "no photos"),
        (dict(json={**_json_body(), "colour": "red"}), 422, "malformed-request", "malformed request"),
        (dict(content=b"{not json", headers={"content-type": "application/json"}), 422, "malformed-request",
         "malformed request"),
        (dict(content=b"hello", headers={"content-type": "text/plain"}), 415, "unsupported-media-type",
         "multipart/form-data"),
        (dict(json=_json_body(), headers={"Idempotency-Key": "x" * 300}), 422, "malformed-request", "Idempotency-Key"),
    ]
    for kwargs, status, slug, message in cases:
        headers = {**kwargs.pop("headers", {}), **_auth()}
        resp = client.post("/v1/protect", **kwargs, headers=headers)
        assert message in _problem(resp, status, slug)["detail"], (message, resp.text)
    _problem(client.get("/v1/jobs/0123456789abcdef", headers=_auth()), 404, "not-found")
    _problem(client.get("/v1/jobs/..%2F..%2Fkeys", headers=_auth()), 404, "not-found")
    _problem(client.get(f"/v1/jobs/{'0' * 32}/photos/x", headers=_auth()), 422, "malformed-request")
    _problem(client.put("/v1/jobs", headers=_auth()), 405, "method-not-allowed")


def test_capacity_is_checked_before_the_body_is_read(client, served):
    """With the pending slots full, even an unparseable body gets 503 + Retry-After, not 422."""
    from capray.serve.store import JobRequest, JobState, JobStore

    cfg = served["cfg"]
    store = JobStore(cfg.serve.store)
    fake = [f"{i:032x}" for i in range(cfg.serve.capacity)]
    now = time.time()
    for job_id in fake:  # pending jobs of a live runner elsewhere (their lease is fresh)
        store.create(JobRequest(job_id=job_id, owner="x", identity="x", names=[], config={}, created_at=now), [],
                     JobState(job_id=job_id, owner="x", created_at=now, updated_at=now, holder="elsewhere"), 3600)
    try:
        resp = client.post("/v1/protect", content=b"{not json", headers={**_auth(), "content-type": "application/json"})
        assert _problem(resp, 503, "server-busy") and resp.headers["retry-after"] == "30"
        assert client.post("/v1/protect:sync", json=_json_body(), headers=_auth()).status_code == 503
    finally:
        for job_id in fake:
            store.delete(job_id, "x")
    assert client.post("/v1/protect", content=b"{not json", headers={**_auth(), "content-type": "application/json"}
                       ).status_code == 422


def _server_rss() -> int:
    """RSS of this test's Serve proxy and ingress replicas (descendants of this process only)."""
    import psutil

    total = 0
    for proc in psutil.Process(os.getpid()).children(recursive=True):
        try:
            title = " ".join(proc.cmdline())
            if "ProxyActor" in title or f"{APP}:Ingress" in title:
                total += proc.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def _stream_post(port: int, total: int, headers: dict[str, str], chunk: int = 1 << 20) -> tuple[int, int, bytes]:
    """POST `total` bytes chunked, stopping as soon as the server answers; (bytes sent, status, body)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    sock.sendall(f"POST /v1/protect HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n{head}\r\n".encode())
    block = f"{chunk:x}\r\n".encode() + b"x" * chunk + b"\r\n"
    sent = 0
    try:
        while sent < total and not select.select([sock], [], [], 0)[0]:
            sock.sendall(block)
            sent += chunk
    except (TimeoutError, BrokenPipeError, ConnectionResetError):
        pass
    reply = b""
    try:
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            data = sock.recv(65536)
            if not data:
                break
            reply += data
    except (TimeoutError, ConnectionResetError):
        pass
    sock.close()
    status = int(reply.split(b" ", 2)[1]) if reply.startswith(b"HTTP/") else 0
    return sent, status, reply.partition(b"\r\n\r\n")[2]


@pytest.mark.slow
def test_a_300_mb_body_is_refused_while_it_streams_without_the_server_holding_it(served):
    limit, body = served["cfg"].serve.max_request_bytes, 300 * 1024 * 1024
    headers = {**_auth(), "Content-Type": "application/json"}
    _stream_post(served["port"], 2 * limit, headers)  # warm up: first-request allocations are not the body
    before = _server_rss()
    sent, status, reply = _stream_post(served["port"], body, headers)
    grown = _server_rss() - before
    print(f"300 MiB body: {sent / 2**20:.0f} MiB sent before the 413, server RSS {grown / 2**20:+.1f} MiB")
    assert status == 413 and b"serve.max_request_bytes" in reply, (status, reply[:200])
    assert sent < body, "the server read the whole body before refusing it"
    # the proxy refuses it (capray.serve.body_limit): what it read is about the limit, not the body
    assert sent < 4 * limit, f"{sent / 2**20:.0f} MiB were read before the 413"
    assert grown < 4 * limit, f"server RSS grew by {grown / 2**20:.0f} MiB for a {body / 2**20:.0f} MiB body"
    # a declared length over the limit is refused from the header alone
    sock = socket.create_connection(("127.0.0.1", served["port"]), timeout=10)
    sock.sendall((f"POST /v1/protect HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ALICE}\r\n"
                  f"Content-Type: application/json\r\nContent-Length: {body}\r\n\r\n").encode())
    assert sock.recv(65536).startswith(b"HTTP/1.1 413")
    sock.close()


# -- restarts (last: leaves a restarted app) ------------------------------------------------------------

@pytest.mark.slow
def test_a_restart_keeps_finished_jobs_and_settles_pending_ones(client, served, finished):
    from ray import serve

    from capray.serve import errors

    pending = client.post("/v1/protect", json=_json_body(config={"seed": 5}), headers=_auth())
    assert pending.status_code == 202
    serve.delete(APP)  # every replica goes: the runner of the pending job too
    served["restart"]()
    job = finished["ids"][0]
    assert _pngs(client, job, len(PHOTOS)) == finished["pngs"][0]
    settled = _wait(client, pending.json()["job_id"])
    print(f"job pending at the restart ended {settled['status']} after {settled['attempts']} attempt(s)")
    if settled["status"] == "failed":  # allowed, with a reason that names no internals
        assert settled["error"] in (errors.WORKER_LOST, errors.INTERNAL) or "lost" in settled["error"], settled
    else:
        assert settled["status"] == "ok" and len(_pngs(client, settled["job_id"], len(PHOTOS))) == len(PHOTOS)
