"""capray.client and `capray submit` against an httpx.MockTransport playing the endpoint: no Ray, no server.

The fake server records every request, so each test checks what was actually sent (the same
Idempotency-Key on every retry, the photo parts, the DELETE) and what was written to disk; a fake
clock makes the retry and polling schedules instant and exact.
"""

from __future__ import annotations

import io
import json
import uuid
from email.parser import BytesParser
from email.policy import HTTP
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from capray.cli import main
from capray.client import (
    AuthenticationError,
    Client,
    JobFailed,
    NotFound,
    RequestRefused,
    ServerBusy,
    WaitTimeout,
)

URL = "http://capray.test/prefix"


def png_bytes(seed: int, size: int = 8) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def problem(status: int, slug: str, detail: str, headers: dict | None = None, **extra) -> httpx.Response:
    body = {"type": f"urn:capray:problem:{slug}", "title": slug.replace("-", " "), "status": status,
            "detail": detail, **extra}
    return httpx.Response(status, json=body, headers={"Content-Type": "application/problem+json", **(headers or {})})


def form_parts(request: httpx.Request) -> list[tuple[str, str | None, str, bytes]]:
    """(field name, file name, content type, bytes) of each part of a multipart request."""
    head = b"Content-Type: " + request.headers["content-type"].encode() + b"\r\n\r\n"
    message = BytesParser(policy=HTTP).parsebytes(head + request.read())
    return [(part.get_param("name", header="content-disposition"), part.get_filename(), part.get_content_type(),
             part.get_payload(decode=True)) for part in message.iter_parts()]


class FakeTime:
    """`sleep` and `clock` for the client: sleeping only moves the clock, and every pause is recorded."""

    def __init__(self):
        self.now, self.sleeps = 0.0, []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def clock(self) -> float:
        return self.now


class FakeServer:
    """The endpoint's contract in miniature: one job `j1` that is ok with one protected photo per upload.

    `queue[(method, path)]` holds answers (responses, or exceptions to raise) given before the default one.
    """

    def __init__(self):
        self.requests: list[httpx.Request] = []
        self.queue: dict[tuple[str, str], list] = {}
        self.uploaded: list[tuple[str, str | None, str, bytes]] = []
        self.protected: list[bytes] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        request.read()
        self.requests.append(request)
        path = request.url.path.removeprefix("/prefix")
        queued = self.queue.get((request.method, path))
        if queued:
            answer = queued.pop(0)
            if isinstance(answer, Exception):
                raise answer
            return answer
        if (request.method, path) == ("POST", "/v1/protect"):
            self.uploaded = [p for p in form_parts(request) if p[0] == "photo"]
            self.protected = [png_bytes(100 + i) for i in range(len(self.uploaded))]
            return httpx.Response(202, json={"job_id": "j1", "status": "pending", "status_url": f"{URL}/v1/jobs/j1"},
                                  headers={"Location": f"{URL}/v1/jobs/j1", "Retry-After": "1"})
        if (request.method, path) == ("GET", "/v1/jobs/j1"):
            return httpx.Response(200, json=self.ok_status())
        if request.method == "GET" and path.startswith("/v1/jobs/j1/photos/"):
            return httpx.Response(200, content=self.protected[int(path.rsplit("/", 1)[1])],
                                  headers={"Content-Type": "image/png"})
        if (request.method, path) == ("DELETE", "/v1/jobs/j1"):
            return httpx.Response(204)
        return problem(404, "not-found", f"no route {path}")

    def ok_status(self) -> dict:
        photos = [{"name": name, "format": "png", "url": f"{URL}/v1/jobs/j1/photos/{i}", "width": 8, "height": 8,
                   "linf_255": 8.0, "psnr": 40.5, "ssim": 0.98, "notes": []}
                  for i, (_, name, _, _) in enumerate(self.uploaded)]
        return {"job_id": "j1", "status": "ok", "created_at": "2026-12-08T10:11:12.345678Z",
                "progress": {"steps_done": 4, "steps_total": 4}, "attempts": 1,
                "result_zip_url": f"{URL}/v1/jobs/j1/result.zip",
                "result": {"photos": photos, "eps_255": 8.0, "notes": ["tiny model"]}}

    def sent(self, method: str, path: str) -> list[httpx.Request]:
        return [r for r in self.requests if r.method == method and r.url.path == "/prefix" + path]


@pytest.fixture
def server() -> FakeServer:
    return FakeServer()


@pytest.fixture
def fake_time() -> FakeTime:
    return FakeTime()


@pytest.fixture
def client(server, fake_time, monkeypatch):
    monkeypatch.delenv("CAPRAY_API_KEY", raising=False)
    with Client(URL, "k1", transport=httpx.MockTransport(server), sleep=fake_time.sleep,
                clock=fake_time.clock) as c:
        yield c


def pending(steps_done: int = 0, retry_after: str | None = None) -> httpx.Response:
    return httpx.Response(200, json={"job_id": "j1", "status": "pending", "progress": {"steps_done": steps_done,
                                                                                         "steps_total": 4}},
                          headers={"Retry-After": retry_after} if retry_after else {})


# -- submit: safe retries ------------------------------------------------------------------------------------

def test_submit_retries_busy_and_dropped_connection_with_the_same_key_and_body(client, server, fake_time):
    server.queue[("POST", "/v1/protect")] = [
        problem(503, "server-busy", "too many pending jobs", {"Retry-After": "7"}),
        httpx.RemoteProtocolError("Server disconnected without sending a response."),
    ]
    job = client.submit([png_bytes(1), png_bytes(2)], identity="alice")
    posts = server.sent("POST", "/v1/protect")
    assert job.job_id == "j1" and job.status_url == f"{URL}/v1/jobs/j1" and len(posts) == 3
    keys = {r.headers["Idempotency-Key"] for r in posts}
    assert len(keys) == 1 and uuid.UUID(keys.pop()).version == 4
    assert len({r.content for r in posts}) == 1  # byte-for-byte the same request: one boundary
    assert fake_time.sleeps[0] == 7  # the server's Retry-After
    assert 0.5 <= fake_time.sleeps[1] <= 1.0  # the second retry's jittered back-off (0.5 s × 2)
    assert all(r.headers["Authorization"] == "Bearer k1" for r in posts)
    assert posts[0].headers["User-Agent"].startswith("capray-client/")


def test_submit_gives_up_busy_after_its_retries_and_keeps_a_given_key(server, fake_time):
    server.queue[("POST", "/v1/protect")] = [problem(429, "too-many-jobs", "4 jobs in progress",
                                                     {"Retry-After": "30"})] * 3
    with Client(URL, transport=httpx.MockTransport(server), retries=2, sleep=fake_time.sleep) as c:
        with pytest.raises(ServerBusy) as caught:
            c.submit([png_bytes(1)], idempotency_key="my-key")
    posts = server.sent("POST", "/v1/protect")
    assert [r.headers["Idempotency-Key"] for r in posts] == ["my-key"] * 3 and fake_time.sleeps == [30, 30]
    assert caught.value.retry_after == 30 and str(caught.value) == "too-many-jobs (429): 4 jobs in progress"


@pytest.mark.parametrize("response, slug, detail", [
    (problem(422, "invalid-config", "invalid config overrides",
             errors=[{"loc": "attack.pgd_steps", "msg": "Input should be a valid integer"}]),
     "invalid-config", "invalid config overrides"),
    (problem(413, "too-many-photos", "6 photos; at most 4 per request"), "too-many-photos",
     "6 photos; at most 4 per request"),
    (httpx.Response(400, text="bad gateway config\n"), "about:blank", "bad gateway config"),
])
def test_a_refusal_becomes_request_refused_with_its_slug_and_detail_and_is_not_retried(client, server, response,
                                                                                         slug, detail):
    server.queue[("POST", "/v1/protect")] = [response]
    with pytest.raises(RequestRefused) as caught:
        client.submit([png_bytes(1)])
    exc = caught.value
    assert (exc.slug, exc.detail, exc.status) == (slug, detail, response.status_code)
    assert len(server.sent("POST", "/v1/protect")) == 1
    if slug == "too-many-photos":
        assert str(exc) == "too-many-photos (413): 6 photos; at most 4 per request"
    if slug == "invalid-config":  # the refused key is named in the message, not only in the body
        assert str(exc) == ("invalid-config (422): invalid config overrides "
                            "(attack.pgd_steps: Input should be a valid integer)")


def test_the_key_comes_from_the_environment_and_a_401_is_an_authentication_error(server, monkeypatch):
    server.queue[("GET", "/v1/jobs/j1")] = [problem(401, "invalid-key", "unknown API key",
                                                    {"WWW-Authenticate": 'Bearer error="invalid_token"'})]
    monkeypatch.setenv("CAPRAY_API_KEY", "from-env")
    with Client(URL, transport=httpx.MockTransport(server)) as c, pytest.raises(AuthenticationError) as caught:
        c.status("j1")
    assert server.requests[0].headers["Authorization"] == "Bearer from-env"
    assert caught.value.slug == "invalid-key" and caught.value.status == 401
    monkeypatch.delenv("CAPRAY_API_KEY")
    with Client(URL, transport=httpx.MockTransport(server)) as c:
        c.status("j1")
    assert "Authorization" not in server.requests[-1].headers  # no key: no header (a keyless loopback server)


def test_a_bad_url_is_refused_before_any_request():
    for url in ("capray.test:8000", "ftp://capray.test", "http://"):
        with pytest.raises(ValueError, match="bad URL"):
            Client(url)


# -- photos in every form ---------------------------------------------------------------------------------------

def test_photos_given_as_path_bytes_pil_and_numpy_are_sent_as_files(client, server, tmp_path):
    path = tmp_path / "IMG_1.JPG"
    path.write_bytes(png_bytes(1))  # the bytes go as they are, whatever the suffix says
    raw = png_bytes(2)
    pil = Image.fromarray(np.full((6, 5, 3), 40, np.uint8))
    array = np.random.default_rng(3).integers(0, 256, (4, 7, 4), dtype=np.uint8)
    client.submit([str(path), raw, pil, array], identity="bob", options={"output": {"format": "webp"}})
    parts = form_parts(server.sent("POST", "/v1/protect")[0])
    options = [json.loads(p[3]) for p in parts if p[0] == "options"]
    assert options == [{"identity": "bob", "config": {"output": {"format": "webp"}}}]
    photos = [p for p in parts if p[0] == "photo"]
    assert [(name, ctype) for _, name, ctype, _ in photos] == [
        ("IMG_1.JPG", "image/jpeg"), ("photo-1.png", "image/png"), ("photo-2.png", "image/png"),
        ("photo-3.png", "image/png")]
    assert photos[0][3] == path.read_bytes() and photos[1][3] == raw
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(photos[2][3]))), np.asarray(pil))
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(photos[3][3]))), array)


def test_a_numpy_photo_must_be_uint8_rgb_or_rgba(client):
    with pytest.raises(ValueError, match="uint8 HxWx3"):
        client.submit([np.zeros((4, 4), np.float32)])


# -- wait -----------------------------------------------------------------------------------------------------------

def test_wait_honours_retry_after_grows_its_own_pace_and_rides_out_transient_errors(client, server, fake_time):
    server.queue[("GET", "/v1/jobs/j1")] = [
        pending(0, retry_after="3"), pending(1), pending(2),
        problem(503, "server-busy", "busy", {"Retry-After": "2"}),
        httpx.ConnectError("connection refused"),
        pending(3), pending(3, retry_after="4"),
    ]
    seen = []
    status = client.wait("j1", on_progress=lambda s: seen.append(s["progress"]["steps_done"]))
    assert status["status"] == "ok"
    assert fake_time.sleeps[:4] == [3, 1.0, 1.5, 2]  # server's value; else 1 s ×1.5; a 503's Retry-After
    assert 0.5 <= fake_time.sleeps[4] <= 1.0  # the connection error's back-off (second failure in a row: 1 s)
    assert fake_time.sleeps[5:] == [2.25, 4]
    assert seen == [0, 1, 2, 3, 3, 4]
    assert len(server.sent("GET", "/v1/jobs/j1")) == 8


def test_wait_raises_job_failed_with_the_servers_error(client, server):
    failed = {"job_id": "j1", "status": "failed", "error": "timed out after 600 s (serve.job_timeout_s)"}
    server.queue[("GET", "/v1/jobs/j1")] = [pending(), httpx.Response(200, json=failed)]
    with pytest.raises(JobFailed) as caught:
        client.wait("j1")
    assert caught.value.job_id == "j1" and caught.value.error == failed["error"]
    assert caught.value.status == failed and "timed out after 600 s" in str(caught.value)


def test_wait_raises_wait_timeout_at_its_bound(client, server, fake_time):
    server.queue[("GET", "/v1/jobs/j1")] = [pending(2) for _ in range(10)]
    with pytest.raises(WaitTimeout) as caught:
        client.wait("j1", timeout=5)
    assert fake_time.sleeps == [1.0, 1.5, 2.25, 0.25]  # the last pause ends at the bound, then one last poll
    assert caught.value.waited_s == 5 and "still pending after 5 s, step 2/4" in str(caught.value)
    assert len(server.sent("GET", "/v1/jobs/j1")) == 5


def test_wait_stops_at_a_job_that_is_gone(client, server):
    server.queue[("GET", "/v1/jobs/j1")] = [problem(404, "not-found", "no job j1")]
    with pytest.raises(NotFound):
        client.wait("j1")


# -- results, listing, deleting --------------------------------------------------------------------------------

def test_protect_with_delete_downloads_every_photo_saves_them_and_deletes_the_job(client, server, tmp_path):
    result = client.protect([("a b.jpg", png_bytes(1)), ("x/../a b.png", png_bytes(2))], "alice", delete=True)
    assert [(r.method, r.url.path.removeprefix("/prefix")) for r in server.requests] == [
        ("POST", "/v1/protect"), ("GET", "/v1/jobs/j1"), ("GET", "/v1/jobs/j1/photos/0"),
        ("GET", "/v1/jobs/j1/photos/1"), ("DELETE", "/v1/jobs/j1")]
    assert [p.data for p in result.photos] == server.protected
    assert result.record == {"eps_255": 8.0, "notes": ["tiny model"]} and result.photos[0].psnr == 40.5
    assert result.photos[1].image().size == (8, 8)
    paths = result.save(tmp_path / "out")
    assert all(p.parent == tmp_path / "out" and p.suffix == ".png" for p in paths) and len(set(paths)) == 2
    assert [p.read_bytes() for p in paths] == server.protected  # one shared stem, two files, nothing outside
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["job_id"] == "j1" and [p["file"] for p in summary["photos"]] == [p.name for p in paths]


def test_protect_without_delete_leaves_the_job(client, server):
    client.protect([png_bytes(1)])
    assert not server.sent("DELETE", "/v1/jobs/j1")


def test_jobs_follows_the_cursor_through_every_page(client, server):
    pages = [{"jobs": [{"job_id": "j3"}, {"job_id": "j2"}], "next_cursor": "c1"},
             {"jobs": [{"job_id": "j1"}], "next_cursor": "c2"}, {"jobs": [], "next_cursor": None}]
    server.queue[("GET", "/v1/jobs")] = [httpx.Response(200, json=page) for page in pages]
    assert [j["job_id"] for j in client.jobs(limit=2)] == ["j3", "j2", "j1"]
    assert [dict(r.url.params) for r in server.sent("GET", "/v1/jobs")] == [
        {"limit": "2"}, {"limit": "2", "cursor": "c1"}, {"limit": "2", "cursor": "c2"}]


def test_delete_of_an_unknown_job_is_not_found_and_the_zip_streams_to_a_file(client, server, tmp_path):
    server.queue[("DELETE", "/v1/jobs/nope")] = [problem(404, "not-found", "no job nope")]
    with pytest.raises(NotFound, match="not-found \\(404\\): no job nope"):
        client.delete("nope")
    server.queue[("GET", "/v1/jobs/j1/result.zip")] = [httpx.Response(200, content=b"PK\x03\x04" + b"z" * 200_000)]
    path = client.download_zip("j1", tmp_path / "result.zip")
    assert path.read_bytes() == b"PK\x03\x04" + b"z" * 200_000 and list(tmp_path.iterdir()) == [path]


# -- capray submit ----------------------------------------------------------------------------------------------

@pytest.fixture
def cli_server(server, fake_time, monkeypatch) -> FakeServer:
    """`capray submit` talking to the fake server."""
    import capray.client.command as command

    monkeypatch.delenv("CAPRAY_API_KEY", raising=False)
    monkeypatch.setattr(command, "make_client", lambda url: Client(
        url, transport=httpx.MockTransport(server), sleep=fake_time.sleep, clock=fake_time.clock))
    return server


@pytest.fixture
def photos_dir(tmp_path) -> Path:
    folder = tmp_path / "alice"
    folder.mkdir()
    for name, seed in (("b.JPG", 2), ("a.png", 1)):
        (folder / name).write_bytes(png_bytes(seed))
    (folder / "notes.txt").write_text("not a photo")
    (folder / "._a.png").write_bytes(b"AppleDouble")  # macOS metadata, not a photo
    (folder / "sub").mkdir()
    (folder / "sub" / "c.png").write_bytes(png_bytes(3))  # not recursive
    return folder


def test_submit_command_saves_the_protected_photos_and_summary_then_deletes_the_job(cli_server, photos_dir,
                                                                                  tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["submit", "--url", URL, str(photos_dir), str(out), "--format", "webp",
                 "--set", "attack.pgd_steps=4", "--set", "seed=7"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.out.strip().splitlines() == [f"RESULT submit job=j1 photos=2 ok=true out={out}"]
    assert "submitted 2 photos of 'alice' as job j1" in captured.err
    parts = form_parts(cli_server.sent("POST", "/v1/protect")[0])
    assert [p[1] for p in parts if p[0] == "photo"] == ["a.png", "b.JPG"]
    assert json.loads(next(p[3] for p in parts if p[0] == "options")) == {
        "identity": "alice", "config": {"attack": {"pgd_steps": 4}, "seed": 7, "output": {"format": "webp"}}}
    assert (out / "a.png").read_bytes() == cli_server.protected[0]
    assert (out / "b.png").read_bytes() == cli_server.protected[1]
    assert json.loads((out / "summary.json").read_text())["eps_255"] == 8.0
    assert len(cli_server.sent("DELETE", "/v1/jobs/j1")) == 1


def test_submit_command_keeps_the_job_when_asked(cli_server, photos_dir, tmp_path):
    assert main(["submit", "--url", URL, "--keep-on-server", "--identity", "Al", str(photos_dir),
                 str(tmp_path / "out")]) == 0
    assert not cli_server.sent("DELETE", "/v1/jobs/j1")
    options = json.loads(next(p[3] for p in form_parts(cli_server.requests[0]) if p[0] == "options"))
    assert options["identity"] == "Al"


@pytest.mark.parametrize("case", ["same-dir", "no-photos", "bad-url", "missing-dir"])
def test_submit_command_refuses_unusable_input_with_exit_2_and_sends_nothing(cli_server, photos_dir, tmp_path,
                                                                            capsys, case):
    empty = tmp_path / "empty"
    empty.mkdir()
    photos, out, url = {"same-dir": (photos_dir, photos_dir, URL), "no-photos": (empty, tmp_path / "o", URL),
                        "bad-url": (photos_dir, tmp_path / "o", "capray.test"),
                        "missing-dir": (tmp_path / "nope", tmp_path / "o", URL)}[case]
    before = sorted(photos_dir.iterdir())
    assert main(["submit", "--url", url, str(photos), str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("capray submit: ") and {"same-dir": "overwrite the originals", "no-photos": "no photos",
                                                  "bad-url": "bad URL", "missing-dir": "not a folder"}[case] in err
    assert cli_server.requests == [] and sorted(photos_dir.iterdir()) == before


def test_submit_command_exits_2_on_a_bad_key_and_1_on_a_failed_job(cli_server, photos_dir, tmp_path, capsys):
    cli_server.queue[("POST", "/v1/protect")] = [problem(401, "unauthorized", "no API key")]
    assert main(["submit", "--url", URL, str(photos_dir), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "unauthorized (401): no API key" in err and "CAPRAY_API_KEY" in err
    assert not (tmp_path / "out").exists()

    failed = {"job_id": "j1", "status": "failed", "error": "the protection worker stopped"}
    cli_server.queue[("GET", "/v1/jobs/j1")] = [httpx.Response(200, json=failed)]
    assert main(["submit", "--url", URL, str(photos_dir), str(tmp_path / "out")]) == 1
    captured = capsys.readouterr()
    assert "job j1 failed: the protection worker stopped" in captured.err
    assert "ok=false" in captured.out and len(cli_server.sent("DELETE", "/v1/jobs/j1")) == 1  # uploads go too
