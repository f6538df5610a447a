"""The online endpoint: request validation, the job table, the Serve YAML, and the real app over HTTP.

The HTTP tests run `serve.run` on 127.0.0.1 inside the shared Ray cluster and talk to it with httpx:
protected PNGs keep their size and the L∞ budget, the same request gives the same bytes, and those
bytes equal the engine called directly in this process.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
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

def test_overrides_may_tune_the_attack_but_not_what_the_server_owns_or_raise_its_cost():
    from capray.config import load_config
    from capray.serve.limits import RequestError, effective_config

    server = load_config(preset="smoke")
    cfg = effective_config(server, {"seed": 7, "attack": {"eps": 0.03, "alpha": 0.003}, "cap": {"ratio_max": 5}})
    assert (cfg.seed, cfg.attack.eps, cfg.cap.ratio_max, cfg.model) == (7, 0.03, 5, server.model)
    cheaper = effective_config(server, {"cap": {"search": "fast", "score_draws": 1, "start_fraction": 0.9}})
    assert (cheaper.cap.score_draws, cheaper.cap.start_fraction) == (1, 0.9)
    no_prior = load_config(preset="smoke", overrides={"attack": {"surrogate": {"prior_preservation": False}}})
    refused = [
        (server, {"model": {"sd": "/etc"}}, "config.model.sd"),
        (server, {"serve": {"max_photos": 1000}}, "config.serve.max_photos"),
        (server, {"batch": {"num_actors": 9}}, "not settable per request"),
        (server, {"attack": {"fsmg_model": "/tmp/x"}}, "config.attack.fsmg_model"),
        (server, {"attack": {"surrogate": {"class_prompt": "a dog"}}}, "class_prompt"),
        (server, {"attack": {"epz": 0.1}}, "config.attack.epz"),
        (server, {"attack": {"eps": "big"}}, "invalid config overrides"),
        (server, {"attack": {"alpha": 0.5}}, "invalid config overrides"),  # alpha > eps
        (server, {"cap": {"ratio_max": 11}}, "cap.ratio_max = 11 > 10"),
        (server, {"cap": {"search": "reference"}}, "config.cap.search = 'reference' costs more"),
        (server, {"cap": {"score_draws": 3}}, "cap.score_draws = 3 > 1"),
        (server, {"cap": {"candidate_batch_size": 1}}, "not settable per request"),
        (server, {"cap": {"start_fraction": 0.1}}, "cap.start_fraction = 0.1 < 0.5"),
        (server, {"attack": {"surrogate": {"batch_size": 4}}}, "surrogate.batch_size = 4 > 1"),
        # the smoke server trains 2 outer loops x 1 step: FSMG may not train longer than that
        (server, {"attack": {"method": "fsmg", "fsmg_train_steps": 2}}, None),
        (server, {"attack": {"method": "fsmg", "fsmg_train_steps": 3}}, "fsmg_train_steps = 3 > 2"),
        (server, {"attack": {"outer_loops": 3}}, "3 surrogate training steps > this server's 2"),
        (no_prior, {"attack": {"surrogate": {"prior_preservation": True}}}, "prior_preservation = True costs more"),
        (server, {"attack": {"adv_steps": 1000}}, "PGD steps requested"),
    ]
    for base, overrides, message in refused:
        if message is None:
            effective_config(base, overrides)
            continue
        with pytest.raises(RequestError) as info:
            effective_config(base, overrides)
        assert info.value.status == 422 and message in str(info.value.detail), (overrides, info.value.detail)


def test_every_attack_cap_and_output_setting_is_either_tunable_or_server_owned():
    """A new config knob must be classified: open to requests (and capped if it costs) or the server's."""
    from capray.config import CaprayConfig
    from capray.serve.limits import CEILINGS, FLOORS, ORDERED, SERVER_ONLY, TUNABLE, _leaves

    cfg = CaprayConfig().model_dump()
    leaves = set(_leaves({"attack": cfg["attack"], "cap": cfg["cap"], "output": cfg["output"]})) | {"seed"}
    assert not TUNABLE & SERVER_ONLY
    assert TUNABLE | SERVER_ONLY == leaves, (leaves - TUNABLE - SERVER_ONLY, (TUNABLE | SERVER_ONLY) - leaves)
    assert set(CEILINGS) | set(FLOORS) | set(ORDERED) <= TUNABLE


def _forged_png(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but holds no pixel data: only a decoder would notice."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_photo_errors_name_the_photo_and_the_pixel_budget_is_checked_on_headers():
    from capray.config import ServeConfig
    from capray.serve.limits import RequestError, check_pixels, header_size
    from capray.serve.requests import decode_photos, from_json

    limits = ServeConfig(max_photos=3, max_photo_bytes=50_000, max_image_pixels=200 * 200, max_request_pixels=100_000)
    good = base64.b64encode(_png(PHOTOS[0])).decode()
    sub = from_json(json_body([good, "data:image/png;base64," + good]), limits)
    decoded = decode_photos(sub.files, sub.names, limits)
    assert [d.rgb.shape for d in decoded] == [(72, 96, 3)] * 2 and np.array_equal(decoded[0].rgb, PHOTOS[0])
    parse_cases = [
        ([good] * 4, 413, None, "at most 3"),
        (["***"], 422, 0, "base64"),
        (["A" * 80_000], 413, 0, "larger than"),
    ]
    for photos, status, index, message in parse_cases:
        with pytest.raises(RequestError) as info:
            from_json(json_body(photos), limits)
        assert info.value.status == status and message in info.value.detail, info.value.detail
        assert info.value.context.get("photo") == index
    for files, index, message in [([_png(PHOTOS[0]), b"not an image"], 1, "not a recognised"),
                                  ([_png(np.zeros((300, 300, 3), np.uint8))], 0, "serve.max_image_pixels")]:
        with pytest.raises(RequestError) as info:
            decode_photos(files, [None] * len(files), limits)
        detail = info.value.detail
        assert info.value.status == 422 and message in detail and info.value.context["photo"] == index
    # 16 "40 MP" photos of a few bytes each: the budget refuses them from the headers alone
    bombs = [_forged_png(8000, 5000)] * 16
    assert header_size(bombs[0]) == (8000, 5000) and len(b"".join(bombs)) < 2000
    with pytest.raises(RequestError) as info:
        check_pixels(bombs, ServeConfig())
    assert info.value.status == 413 and "640000000 pixels" in info.value.detail
    check_pixels([_png(PHOTOS[0])] * 2, limits)  # 2 x 6912 px: within 100 000


def json_body(photos: list[str], **extra) -> bytes:
    import json

    return json.dumps({"photos": [{"data": d, "name": f"p{i}"} for i, d in enumerate(photos)], **extra}).encode()


def test_api_keys_from_env_and_a_file_that_is_re_read_when_it_changes(tmp_path):
    import os

    from capray.serve.auth import ANONYMOUS, AuthError, KeyRing, check_exposure

    keys_file = tmp_path / "keys"
    keys_file.write_text("# rotated monthly\nfile-key-1\n")
    ring = KeyRing(str(keys_file), env="env-key-1, env-key-2", recheck_s=0)
    owners = {ring.authenticate(f"Bearer {k}") for k in ("env-key-1", "env-key-2", "file-key-1")}
    assert len(owners) == 3 and ANONYMOUS not in owners and not any("key" in o for o in owners)
    assert ring.authenticate("bearer env-key-1") == ring.authenticate("Bearer  env-key-1 ")
    # RFC 6750: no usable credentials → 401 + a bare challenge; an unknown key → 401 + invalid_token
    for header, slug in [(None, "unauthorized"), ("", "unauthorized"), ("Basic abc", "unauthorized"),
                         ("Bearer ", "unauthorized"), ("Bearer nope", "invalid-key"),
                         ("Bearer # rotated monthly", "invalid-key")]:
        with pytest.raises(AuthError) as info:
            ring.authenticate(header)
        challenge = info.value.headers["WWW-Authenticate"]
        assert info.value.status == 401 and info.value.slug == slug, header
        assert challenge.startswith("Bearer") and ('error="invalid_token"' in challenge) == (slug == "invalid-key")
    keys_file.write_text("file-key-2\n")  # the Secret was rotated
    os.utime(keys_file, (1, 1))  # a distinct mtime even on a coarse clock
    with pytest.raises(AuthError):
        ring.authenticate("Bearer file-key-1")
    assert ring.authenticate("Bearer file-key-2")

    keyless = KeyRing(None, env="")
    assert not keyless.configured and keyless.authenticate(None) == ANONYMOUS
    nobody = KeyRing(str(tmp_path / "missing"), env="")  # a key file is configured but not there: refused
    assert not nobody.configured
    with pytest.raises(AuthError) as info:
        nobody.authenticate(None)
    assert info.value.status == 503
    for host in ("127.0.0.1", "localhost", "::1"):
        check_exposure(host, nobody, allow_unauthenticated=False)
    with pytest.raises(ValueError, match="no API keys configured"):
        check_exposure("0.0.0.0", nobody, allow_unauthenticated=False)
    check_exposure("0.0.0.0", nobody, allow_unauthenticated=True)
    check_exposure("0.0.0.0", ring, allow_unauthenticated=False)


def test_auth_fails_closed_when_the_keys_file_is_emptied_or_deleted(tmp_path):
    """A Secret deleted or rotated to empty must not open the endpoint: every request is refused."""
    import os

    from capray.serve.auth import NO_KEYS, AuthError, KeyRing

    keys_file = tmp_path / "keys"
    keys_file.write_text("key-1\n")
    ring = KeyRing(str(keys_file), env="", recheck_s=0)
    assert ring.authenticate("Bearer key-1")
    keys_file.write_text("# nothing here\n")  # rotated to an empty Secret
    os.utime(keys_file, (2, 2))
    for header in (None, "Bearer key-1", "Bearer other"):
        with pytest.raises(AuthError) as info:
            ring.authenticate(header)
        assert info.value.status == 503 and str(info.value) == NO_KEYS and info.value.headers["Retry-After"]
    keys_file.unlink()  # the Secret was deleted
    with pytest.raises(AuthError) as info:
        ring.authenticate("Bearer key-1")
    assert info.value.status == 503
    keys_file.write_text("key-2\n")  # restored: keys work again, the old one does not
    assert ring.authenticate("Bearer key-2")
    with pytest.raises(AuthError) as info:
        ring.authenticate("Bearer key-1")
    assert info.value.status == 401 and info.value.slug == "invalid-key"
    # env keys plus an emptied file: the env keys still work, anyone else still needs one
    mixed = KeyRing(str(keys_file), env="env-key", recheck_s=0)
    keys_file.write_text("")
    os.utime(keys_file, (3, 3))
    assert mixed.authenticate("Bearer env-key")
    with pytest.raises(AuthError) as info:
        mixed.authenticate(None)
    assert info.value.status == 401


def _refs(node) -> set[str]:
    if isinstance(node, dict):
        return {node["$ref"]} if "$ref" in node else set().union(*map(_refs, node.values()))
    return set().union(*map(_refs, node)) if isinstance(node, list) else set()


def test_the_published_openapi_document_is_the_apps_and_complete(tmp_path):
    """docs/openapi.json is what `capray serve --openapi` writes from the app (regenerate it when this fails):
    a Bearer scheme on every route but healthz, every error response a Problem, every $ref resolvable."""
    from capray.cli import main
    from capray.serve.app import api, openapi_document
    from capray.serve.problems import MEDIA_TYPE, PROBLEMS

    written = tmp_path / "openapi.json"
    assert main(["serve", "--openapi", str(written)]) == 0
    published = ROOT / "docs" / "openapi.json"
    assert written.read_text() == published.read_text(), \
        "docs/openapi.json drifted from the app: run `capray serve --openapi docs/openapi.json`"
    doc = json.loads(published.read_text())
    assert api.openapi_url is None and api.docs_url is None and api.redoc_url is None  # FastAPI's keyless pages: off
    assert doc == openapi_document() and doc["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    operations = {(method, path): op for path, ops in doc["paths"].items() for method, op in ops.items()}
    assert {("post", "/v1/protect"), ("get", "/v1/jobs"), ("delete", "/v1/jobs/{job_id}"),
            ("get", "/v1/jobs/{job_id}/result.zip"), ("post", "/v1/protect:sync")} <= set(operations)
    for (method, path), op in operations.items():
        assert ("security" in op) == (path != "/v1/healthz"), path
        errors = {code: r for code, r in op["responses"].items() if int(code) >= 400}
        assert all(list(r["content"]) == [MEDIA_TYPE] for r in errors.values()), (method, path)
        if path != "/v1/healthz":
            assert {"401", "403"} <= set(errors), (method, path)
    assert {ref.rsplit("/", 1)[1] for ref in _refs(doc)} <= set(doc["components"]["schemas"])
    described = json.dumps(doc["components"]["schemas"]["Problem"])
    catalogue = (ROOT / "docs" / "endpoint.md").read_text()
    assert all(slug in described and f"| {status} | `{slug}` |" in catalogue for slug, (status, _) in PROBLEMS.items())


def _asgi_client(chunks: list[bytes]):
    """A client's side of one ASGI request: `receive` hands out `chunks`, `send` records the reply."""
    state = {"received": 0, "sent": []}

    async def receive():
        i = state["received"]
        state["received"] += 1
        return {"type": "http.request", "body": chunks[i], "more_body": i + 1 < len(chunks)}

    async def send(message):
        state["sent"].append(message)

    return state, receive, send


def _proxy_like_app(log: list):
    """Stands for Serve's proxy: drains the body until it ends or the client leaves, then answers."""
    async def app(scope, receive, send):
        body = b""
        while True:
            message = await receive()
            log.append(message["type"])
            if message["type"] == "http.disconnect":
                await send({"type": "http.response.start", "status": 499, "headers": []})
                return await send({"type": "http.response.body", "body": b"client left"})
            body += message["body"]
            if not message["more_body"]:
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})

    return app


def test_the_proxy_body_limit_answers_413_as_the_bytes_pass_it_and_reads_no_further():
    """Serve's proxy queues a body as fast as it arrives; the guard in front of it stops at the limit."""
    import json

    from capray.serve.body_limit import BodyLimit

    http = {"type": "http", "headers": [(b"content-type", b"application/json")]}
    log: list = []
    state, receive, send = _asgi_client([b"x" * 1000] * 300)  # a 300 kB body against a 2.5 kB limit
    asyncio.run(BodyLimit(_proxy_like_app(log), limit=2500)(http, receive, send))
    assert state["received"] == 3, "the guard read past the first chunk over the limit"
    assert log == ["http.request", "http.request", "http.disconnect"]  # the proxy cancels the replica call
    start, body = state["sent"]  # the proxy's own 499 reply to the disconnect is dropped
    assert start["status"] == 413 and (b"connection", b"close") in start["headers"]
    assert (b"content-type", b"application/problem+json") in start["headers"]
    problem = json.loads(body["body"])
    assert problem["type"] == "urn:capray:problem:body-too-large" and problem["status"] == 413
    assert problem["detail"] == (
        "request body larger than 2500 bytes (serve.max_request_bytes)")

    # at the limit: every byte passes through unchanged
    state, receive, send = _asgi_client([b"a" * 1000, b"b" * 1000, b"c" * 500])
    asyncio.run(BodyLimit(_proxy_like_app([]), limit=2500)(http, receive, send))
    assert state["sent"][0]["status"] == 200 and state["sent"][1]["body"] == b"a" * 1000 + b"b" * 1000 + b"c" * 500

    # a declared length over the limit: refused from the header, the app never runs
    log = []
    state, receive, send = _asgi_client([b"x" * 3000])
    declared = {"type": "http", "headers": [(b"content-length", b"3000")]}
    asyncio.run(BodyLimit(_proxy_like_app(log), limit=2500)(declared, receive, send))
    assert log == [] and state["received"] == 0 and state["sent"][0]["status"] == 413


def test_the_proxy_body_limit_lets_an_answer_already_started_finish_and_only_stops_reading():
    """When the replica answers before the body is over (a 401, say), that answer is the one the client gets."""
    from capray.serve.body_limit import BodyLimit

    async def answers_early(scope, receive, send):
        await send({"type": "http.response.start", "status": 401, "headers": []})
        reading = asyncio.ensure_future(_drain(receive))
        await asyncio.sleep(0.05)
        assert not reading.done(), "past the limit, receive must wait, not hand the proxy more bytes"
        await send({"type": "http.response.body", "body": b"no key"})
        reading.cancel()  # what the proxy does once the response is sent

    async def _drain(receive):
        while True:
            await receive()

    state, receive, send = _asgi_client([b"x" * 1000] * 300)
    asyncio.run(BodyLimit(answers_early, limit=2500)(
        {"type": "http", "headers": []}, receive, send))
    assert state["received"] == 3
    assert [m.get("status", m.get("body")) for m in state["sent"]] == [401, b"no key"]


def test_the_proxy_body_limit_is_installed_from_the_node_environment_and_missing_is_reported(monkeypatch):
    from capray.serve import body_limit

    env = body_limit.proxy_env(4_000_000)
    assert body_limit.missing_guard(4_000_000, env) is None
    assert "proxy body limit" in body_limit.missing_guard(4_000_000, {})
    assert "above serve.max_request_bytes" in body_limit.missing_guard(1_000, env)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    (middleware,) = body_limit.proxy_middlewares()  # what Ray's proxy calls (RAY_SERVE_HTTP_PROXY_CALLBACK_...)
    assert middleware.cls is body_limit.BodyLimit and middleware.kwargs == {"limit": 4_000_000}
    module, _, name = env[body_limit.CALLBACK_ENV].partition(":")
    assert getattr(__import__(module, fromlist=[name]), name) is body_limit.proxy_middlewares


def test_uploads_in_flight_are_bounded_per_replica_before_the_body_is_read(tmp_path):
    """Pending jobs do not count bodies still streaming in: a full replica refuses the next upload at once."""
    from types import SimpleNamespace

    from starlette.requests import Request

    from capray.config import load_config
    from capray.serve.app import Ingress
    from capray.serve.limits import KeyLimits, RequestError, UploadSlots
    from capray.serve.store import JobStore

    cfg = load_config(preset="smoke",
                      overrides={"serve": {"store": str(tmp_path / "store"), "max_uploads_in_flight": 2}})
    replica = SimpleNamespace(config=cfg, store=JobStore(cfg.serve.store), sync_in_flight=0,
                              uploads=UploadSlots(cfg.serve.max_uploads_in_flight), key_limits=KeyLimits(cfg.serve))
    admitted = Ingress.func_or_class._admitted
    good = json_body([base64.b64encode(_png(PHOTOS[0])).decode()])

    def upload(body: bytes, gate: asyncio.Event) -> Request:
        """A request whose body arrives when `gate` opens (a slow 100 MB upload)."""
        async def receive() -> dict:
            await gate.wait()
            return {"type": "http.request", "body": body, "more_body": False}

        return Request({"type": "http", "method": "POST", "path": "/v1/protect", "query_string": b"",
                        "headers": [(b"content-type", b"application/json")]}, receive)

    async def admit(request: Request) -> int:
        async with admitted(replica, request, "k1") as (sub, _, decoded, _held):
            return len(decoded)

    async def scenario():
        gate = asyncio.Event()
        slow = [asyncio.create_task(admit(upload(good, gate))) for _ in range(2)]
        await asyncio.sleep(0.05)
        assert replica.uploads.used == 2
        with pytest.raises(RequestError) as info:  # its body never comes: it must not be waited for
            await asyncio.wait_for(admit(upload(good, asyncio.Event())), 2)
        assert info.value.status == 503 and info.value.headers["Retry-After"]
        assert "serve.max_uploads_in_flight" in info.value.detail
        gate.set()
        assert await asyncio.gather(*slow) == [1, 1] and replica.uploads.used == 0
        opened = asyncio.Event()
        opened.set()
        with pytest.raises(RequestError) as info:  # a refused body gives its slot back
            await admit(upload(b"{not json", opened))
        assert info.value.status == 422 and replica.uploads.used == 0
        assert await admit(upload(good, opened)) == 1

    asyncio.run(scenario())

    # a retried submit (its Idempotency-Key recorded) skips admission, but its body still needs a slot
    from starlette.responses import Response

    from capray.serve.store import Idempotent, key_digest

    replica.store.reserve("k1", key_digest("retry-1"), Idempotent(job_id="a" * 32, request_digest="d",
                                                                  created_at=time.time()))
    replica._caller = lambda request, right=None: "k1"
    retried = upload(good, asyncio.Event())  # its body never comes: the refusal must not wait for it
    retried.scope["headers"].append((b"idempotency-key", b"retry-1"))
    replica.uploads.used = replica.uploads.limit  # every slot taken by other uploads
    with pytest.raises(RequestError) as info:
        asyncio.run(Ingress.func_or_class.submit(replica, retried, Response()))
    assert info.value.slug == "server-busy" and "serve.max_uploads_in_flight" in info.value.detail


# -- the edge: slow bodies, per-key limits, formats, off-loop parsing, streamed downloads ----------------

def _replica(tmp_path, **serve):
    """The parts of an ingress replica that admission uses, on a local store (no Ray)."""
    from types import SimpleNamespace

    from capray.config import load_config
    from capray.serve.limits import KeyLimits, UploadSlots
    from capray.serve.store import JobStore

    cfg = load_config(preset="smoke", overrides={"serve": {"store": str(tmp_path / "store"), **serve}})
    return SimpleNamespace(config=cfg, store=JobStore(cfg.serve.store), sync_in_flight=0,
                           uploads=UploadSlots(cfg.serve.max_uploads_in_flight), key_limits=KeyLimits(cfg.serve))


def _request(chunks: list[bytes], delay_s: float = 0.0, content_type: bytes = b"application/json",
             length: int | None = None, then_stall: bool = False):
    """A request whose body arrives in `chunks`, `delay_s` apart (`then_stall`: and then nothing more)."""
    from starlette.requests import Request

    pending = list(chunks)

    async def receive() -> dict:
        if not pending:
            await asyncio.sleep(3600)  # a client that stopped sending
        await asyncio.sleep(delay_s)
        chunk = pending.pop(0)
        return {"type": "http.request", "body": chunk, "more_body": bool(pending) or then_stall}

    headers = [(b"content-type", content_type)] + ([(b"content-length", str(length).encode())] if length else [])
    return Request({"type": "http", "method": "POST", "path": "/v1/protect", "query_string": b"",
                    "headers": headers}, receive)


async def _admit(replica, request, owner="k1") -> int:
    from capray.serve.app import Ingress

    async with Ingress.func_or_class._admitted(replica, request, owner) as (_sub, _cfg, decoded, _held):
        return len(decoded)


def _refusal(coro):
    from capray.serve.limits import RequestError

    with pytest.raises(RequestError) as info:
        asyncio.run(coro)
    return info.value


def test_a_trickled_body_is_refused_in_time_and_gives_its_slot_back(tmp_path):
    """One byte every 50 ms is far under 1 000 bytes/s: refused (408) after the initial allowance plus what
    its bytes earned, not after the request timeout; a body at a fair rate is read whole."""
    replica = _replica(tmp_path, body_timeout_s=0.3, min_body_bytes_per_s=1_000)
    good = json_body([base64.b64encode(_png(PHOTOS[0])).decode()])
    t0 = time.monotonic()
    refused = _refusal(_admit(replica, _request([good[i:i + 1] for i in range(len(good))], delay_s=0.05)))
    assert refused.status == 408 and "serve.min_body_bytes_per_s" in refused.detail
    assert time.monotonic() - t0 < 2 and replica.uploads.used == 0 and not replica.key_limits.active
    stalled = _refusal(_admit(replica, _request([good[:100]], then_stall=True)))  # a little, then nothing
    assert stalled.status == 408
    chunks = [good[i:i + 2_000] for i in range(0, len(good), 2_000)]
    assert asyncio.run(_admit(replica, _request(chunks, delay_s=0.01))) == 1  # 200 kB/s: read whole


def test_one_key_cannot_take_every_job_slot_or_the_bandwidth_and_others_still_get_in(tmp_path):
    from capray.serve.store import JobRequest, JobState

    replica = _replica(tmp_path, max_jobs_per_key=2, max_request_bytes=60_000, max_bytes_per_key_per_min=60_000)
    good = json_body([base64.b64encode(_png(PHOTOS[0])).decode()])
    for i in range(2):  # key k1 already has two pending jobs (on any replica: they are in the store)
        job_id = f"{i:032x}"
        replica.store.create(JobRequest(job_id=job_id, owner="k1", identity="x", names=[], config={}, created_at=0),
                             [], JobState(job_id=job_id, owner="k1", created_at=0, updated_at=0, holder="r"), 60)
    busy = _refusal(_admit(replica, _request([good]), owner="k1"))
    assert busy.status == 429 and "serve.max_jobs_per_key" in busy.detail and busy.headers["Retry-After"]
    assert asyncio.run(_admit(replica, _request([good]), owner="k2")) == 1  # another key is not held up
    # bytes per minute: k2 has sent len(good); a declared body over what is left is refused before it is read
    left = 60_000 - len(good)
    over = _refusal(_admit(replica, _request([good], length=left + 1_000), owner="k2"))
    assert over.status == 429 and "serve.max_bytes_per_key_per_min" in over.detail
    assert 0 < int(over.headers["Retry-After"]) <= 60
    # and one that does not say its length is cut off once its bytes pass the budget
    cut = _refusal(_admit(replica, _request([b" " * 10_000] * 6), owner="k2"))
    assert cut.status == 429 and replica.key_limits._tokens("k2") < 0
    assert asyncio.run(_admit(replica, _request([good]), owner="k3")) == 1


def test_a_config_whose_byte_budget_is_under_one_request_is_refused():
    from pydantic import ValidationError

    from capray.config import ServeConfig

    with pytest.raises(ValidationError, match="max_bytes_per_key_per_min"):
        ServeConfig(max_request_bytes=10_000_000, max_bytes_per_key_per_min=1_000_000)


def test_other_image_formats_are_refused_with_415_before_decoding_and_json_is_parsed_off_the_loop(tmp_path,
                                                                                               monkeypatch):
    import threading

    from PIL import Image

    import capray.serve.requests

    replica = _replica(tmp_path)
    buf = io.BytesIO()
    Image.fromarray(PHOTOS[0]).save(buf, format="GIF")
    gif = json_body([base64.b64encode(_png(PHOTOS[1])).decode(), base64.b64encode(buf.getvalue()).decode()])
    refused = _refusal(_admit(replica, _request([gif])))
    assert refused.status == 415 and refused.context["photo"] == 1 and "GIF" in refused.detail
    parsed_on = []
    real = capray.serve.requests.from_json

    def recording(body, limits):
        parsed_on.append(threading.current_thread() is threading.main_thread())
        return real(body, limits)

    monkeypatch.setattr(capray.serve.requests, "from_json", recording)
    assert asyncio.run(_admit(replica, _request([json_body([base64.b64encode(_png(PHOTOS[0])).decode()])]))) == 1
    assert parsed_on == [False], "the JSON body was parsed on the event loop's thread"


def test_a_stored_job_keeps_how_its_photos_are_written_and_older_jobs_get_the_servers():
    """A rerun (another replica, after a restart) writes the format and metadata the request asked for."""
    from capray.config import JOB_SECTIONS, OutputConfig, load_config

    server = load_config(preset="smoke")
    asked = server.model_copy(update={"output": OutputConfig(format="webp", keep_location=True)})
    stored = asked.model_dump(mode="json", include=set(JOB_SECTIONS))
    assert server.with_engine(stored).output == asked.output != server.output
    older = {k: v for k, v in stored.items() if k != "output"}  # stored before `output` existed
    assert server.with_engine(older).output == server.output


def test_result_zip_is_streamed_one_photo_at_a_time():
    """Each PNG is read just before its entry is sent; the chunks make the same archive a client unzips."""
    import zipfile

    from capray.serve.results import result_zip
    from capray.serve.schemas import JobResult, PhotoOut

    record = _record(3)
    result = JobResult(**record.model_dump(), eps=0.05, eps_255=6.4,
                       photos=[PhotoOut(name=f"p{i}.png", width=8, height=8, linf_255=1, psnr=50, ssim=1, notes=[])
                               for i in range(3)])
    events = []

    def read_png(i, fmt):
        events.append(f"read {i}")
        assert fmt == "png"
        return bytes([i]) * 1000

    chunks = []
    for chunk in result_zip(result, read_png):
        events.append("sent")
        chunks.append(chunk)
    assert events == ["read 0", "sent", "read 1", "sent", "read 2", "sent", "sent"]
    with zipfile.ZipFile(io.BytesIO(b"".join(chunks))) as zf:
        assert zf.namelist() == ["00_p0.png", "01_p1.png", "02_p2.png", "summary.json"]
        assert [zf.read(n) for n in zf.namelist()[:3]] == [bytes([i]) * 1000 for i in range(3)]
    assert b"".join(result_zip(result, read_png)) == b"".join(chunks)  # deterministic bytes


# -- the job store and runner without Ray ---------------------------------------------------------------

def _record(n: int, identity: str = "alice"):
    from capray.attack.api import ProtectionRecord

    return ProtectionRecord(identity=identity, method="aspl", config_hash="h", model_id="tiny", seed=0,
                            cap_enabled=True,
                            linf_255=[1.0] * n, linf_255_max=1.0, psnr=[50.0] * n, ssim=[0.99] * n)


def _runner(where, protect, **serve):
    """A runner on a local folder (a path) or on S3 ((uri, fsspec options))."""
    from capray.config import load_config
    from capray.serve.runner import JobRunner
    from capray.serve.store import JobStore

    uri, options = (str(where / "store"), {}) if isinstance(where, Path) else where
    cfg = load_config(preset="smoke", overrides={"serve": {"store": uri, "store_options": options, **serve}})
    store = JobStore(cfg.serve.store, cfg.serve.store_options)
    return JobRunner(store, cfg, protect, tag="r1"), store, cfg


def _submission(photos=PHOTOS):
    from capray.serve.requests import Submission

    return Submission("alice", {}, [_png(a) for a in photos], [f"p{i}.png" for i in range(len(photos))])


async def _invert(rgbs, cfg, identity, on_progress, fixed=()):
    """A stand-in Protector: progress, then 255 - x (an exact, checkable transform)."""
    on_progress(1, 2)
    await asyncio.sleep(0)
    on_progress(2, 2)
    return [255 - a for a in rgbs], _record(len(rgbs), identity)


async def _until_settled(runner, job_id, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = runner.store.state(job_id)
        if state.status != "pending" and job_id not in runner.running:  # the runner's last writes are done too
            return state
        await asyncio.sleep(0.02)
    raise AssertionError("job still pending")


def _pending_ids(store) -> list[str]:
    return [job_id for job_id, _owner in store.pending()]


def _slack(where) -> float:
    """Margin past a lease's TTL before it reads as expired: S3 stamps (Last-Modified, Date) are whole
    seconds, so a lease's age is ±1 s there; a local file's mtime is exact."""
    return 0.1 if isinstance(where, Path) else 1.1


@pytest.fixture
def s3_store(moto_s3, tmp_path):
    """A store of this test's own on the session's moto S3 server: (store URI, fsspec options)."""
    return f"s3://capray-jobs/{tmp_path.name}", moto_s3.bucket("capray-jobs")


@pytest.fixture(params=["local", pytest.param("s3", marks=[pytest.mark.s3, pytest.mark.slow])])
def job_store(request, tmp_path):
    """The store the runner tests run on: a local folder (fast tier) and the moto S3 server (slow tier:
    whole-second stamps make its lease waits a second longer)."""
    return tmp_path if request.param == "local" else request.getfixturevalue("s3_store")


def test_store_keeps_the_job_and_a_lost_runner_is_replaced(job_store):
    """A job left pending by a runner that vanished is rerun from the stored request by another replica."""
    from capray.serve.requests import decode_photos
    from capray.serve.store import JobState

    tmp_path = job_store

    async def scenario():
        lost, store, cfg = _runner(tmp_path, _invert, job_lease_s=1)
        sub = _submission()
        decoded = decode_photos(sub.files, sub.names, cfg.serve)
        state = await lost.submit(sub, decoded, cfg, owner="k1")
        lost.running[state.job_id].cancel()  # the replica died mid-job: nobody renews the lease
        # and a job whose runners kept vanishing: it ends failed, with the reason
        stuck = JobState(job_id="f" * 32, owner="k1", created_at=0, updated_at=0, attempts=2, holder="gone")
        store.create(store.request(state.job_id).model_copy(update={"job_id": stuck.job_id}), sub.files, stuck, 1)
        await asyncio.sleep(0)
        assert store.state(state.job_id).status == "pending" and state.job_id in _pending_ids(store)
        other, _, _ = _runner(tmp_path, _invert, job_lease_s=1)
        other.tag = "r2"
        await other.sweep()
        assert not other.running  # the lease has not run out yet (by the store's clock)
        await asyncio.sleep(1 + _slack(tmp_path))
        await other.sweep()
        done = await _until_settled(other, state.job_id)
        assert (done.status, done.attempts, done.steps_done, done.steps_total) == ("ok", 2, 2, 2)
        assert _pending_ids(store) == []
        for i, clean in enumerate(PHOTOS):
            assert np.array_equal(_png_array(store.photo(state.job_id, i)), 255 - clean)
        assert store.request(state.job_id).owner == "k1"
        failed = store.state(stuck.job_id)
        assert failed.status == "failed" and "lost 2 time(s)" in failed.error
        return state.job_id

    job_id = asyncio.run(scenario())
    # results expire after the TTL: the job's folder and its markers go
    runner, store, _ = _runner(tmp_path, _invert, job_ttl_s=1)
    assert store.state(job_id) is not None
    store.clock = runner.store.clock = lambda: time.time() + 5
    asyncio.run(runner.sweep())
    assert store.state(job_id) is None and store.photo(job_id, 0) is None and store.expired(1) == []


def test_a_hung_or_crashing_protector_fails_the_job_with_a_short_message(tmp_path):
    from ray.exceptions import ActorDiedError

    from capray.serve import errors
    from capray.serve.requests import decode_photos

    async def hang(rgbs, cfg, identity, on_progress, fixed=()):
        on_progress(0, 2)  # it started on the Protector, then never ends
        await asyncio.sleep(3600)

    async def die(rgbs, cfg, identity, on_progress, fixed=()):
        raise ActorDiedError()  # its text names the node IP and PID

    async def scenario(protect, **serve):
        runner, store, cfg = _runner(tmp_path, protect, **serve)
        sub = _submission()
        state = await runner.submit(sub, decode_photos(sub.files, sub.names, cfg.serve), cfg, owner="k1")
        return await _until_settled(runner, state.job_id), store

    t0 = time.monotonic()
    hung, store = asyncio.run(scenario(hang, job_timeout_s=0.5))
    assert hung.status == "failed" and hung.error == errors.timed_out(0.5) and time.monotonic() - t0 < 5
    assert _pending_ids(store) == []  # its slot is free
    died, _ = asyncio.run(scenario(die))
    assert died.status == "failed" and died.error == errors.WORKER_LOST


def test_busy_protectors_are_retried_and_the_time_limit_counts_from_the_start(tmp_path, monkeypatch):
    """A 202 job is not failed because replicas are still scaling up, nor charged for time spent queued."""
    from ray.serve.exceptions import BackPressureError

    import capray.serve.runner
    from capray.serve import errors
    from capray.serve.requests import decode_photos

    monkeypatch.setattr(capray.serve.runner, "BACKOFF_S", 0.01)
    calls = []

    async def busy_twice(rgbs, cfg, identity, on_progress, fixed=()):
        calls.append(time.monotonic())
        if len(calls) <= 2:
            raise BackPressureError(num_queued_requests=2, max_queued_requests=2)
        return await _invert(rgbs, cfg, identity, on_progress)

    async def always_busy(rgbs, cfg, identity, on_progress, fixed=()):
        raise BackPressureError(num_queued_requests=2, max_queued_requests=2)

    async def queued_then_runs(rgbs, cfg, identity, on_progress, fixed=()):
        await asyncio.sleep(0.5)  # behind another group: not part of this job's run time
        on_progress(0, 2)
        await asyncio.sleep(0.4)
        return await _invert(rgbs, cfg, identity, on_progress)

    async def never_starts(rgbs, cfg, identity, on_progress, fixed=()):
        await asyncio.sleep(3600)

    async def scenario(protect, **serve):
        runner, store, cfg = _runner(tmp_path, protect, **serve)
        sub = _submission()
        state = await runner.submit(sub, decode_photos(sub.files, sub.names, cfg.serve), cfg, owner="k1")
        return await _until_settled(runner, state.job_id)

    retried = asyncio.run(scenario(busy_twice))
    assert retried.status == "ok" and len(calls) == 3 and calls[2] - calls[1] >= calls[1] - calls[0]
    t0 = time.monotonic()
    busy = asyncio.run(scenario(always_busy, job_timeout_s=0.3))
    assert busy.status == "failed" and busy.error == errors.BUSY and 0.25 < time.monotonic() - t0 < 5
    late = asyncio.run(scenario(queued_then_runs, job_timeout_s=0.7))  # 0.9 s in all, 0.4 s of it running
    assert late.status == "ok", late.error
    idle = asyncio.run(scenario(never_starts, job_timeout_s=0.3))
    assert idle.status == "failed" and idle.error == errors.not_started(0.3)


def _stored_job(where, job_id: str, ttl_s: float = 60):
    """A store holding one pending job of owner k1, created by runner r1: (store, its state, r1's claim)."""
    from capray.serve.store import JobRequest, JobState, JobStore

    uri, options = (str(where / "store"), {}) if isinstance(where, Path) else where
    store = JobStore(uri, options)
    state = JobState(job_id=job_id, owner="k1", created_at=0, updated_at=0, holder="r1", attempts=1)
    claim = store.create(JobRequest(job_id=job_id, owner="k1", identity="x", names=["p0"], config={}, created_at=0),
                         [b"photo"], state, ttl_s)
    return store, state, claim


def _as(state, holder: str, **update):
    return state.model_copy(update={"holder": holder, **update})


def test_a_job_has_one_holder_and_a_finished_job_is_never_rewritten(job_store):
    """The job's status is its runner's lease: a take-over replaces exactly the version it read (one of two
    replicas wins), the runner it replaced can neither renew nor finish, and once the winner has written
    the outcome no take-over of an older version lands."""
    job_id = "a" * 32
    store, state, claim = _stored_job(job_store, job_id)
    seen = store.peek(job_id)
    assert seen.body["holder"] == "r1" and seen.body["generation"] == 1 and seen.age_s < 30
    theirs = store.take_over(seen, _as(state, "r2", attempts=2), 60)
    assert theirs is not None and theirs.generation == 2
    assert store.take_over(seen, _as(state, "r3", attempts=2), 60) is None  # the same version: r2 won it
    assert not claim.renew() and "taken over" in claim.lost
    assert not store.finish(claim, state.model_copy(), [(b"png", "png")], b"{}") and store.photo(job_id, 0) is None
    assert not store.fail(claim, state.model_copy(), "late") and store.state(job_id).status == "pending"
    assert theirs.renew() and store.state(job_id).holder == "r2"
    assert store.finish(theirs, _as(state, "r2", attempts=2), [(b"png", "png")], b"{}")
    done = store.state(job_id)
    assert (done.status, done.holder, done.attempts, done.generation) == ("ok", "r2", 2, 2)
    assert store.take_over(seen, _as(state, "r3"), 60) is None and store.state(job_id).status == "ok"
    assert _pending_ids(store) == [] and store.photo(job_id, 0) == b"png"


def test_a_store_written_before_job_leases_still_reads(tmp_path):
    """Jobs written by older versions: `done` for `ok`, and the holder named `runner`."""
    import json

    from capray.serve.store import JobState

    job_id = "b" * 32
    store, state, claim = _stored_job(tmp_path, job_id)
    assert store.finish(claim, state.model_copy(), [(b"png", "png")], b"{}")
    status_file = tmp_path / "store" / "jobs" / job_id / "status.json"
    old = json.loads(status_file.read_text())
    assert old["status"] == "ok"
    old.pop("holder")
    status_file.write_text(json.dumps({**old, "status": "done", "runner": "r0", "lease_until": 0.0}))
    assert store.state(job_id).status == "ok" and store.state(job_id).holder == "r0"
    with pytest.raises(ValueError):
        JobState.model_validate({**old, "status": "finished"})  # only the one old word is translated


def test_a_renewal_in_flight_lands_before_the_final_write_never_after(tmp_path, monkeypatch):
    """A renewal already writing in its thread when the job finishes: the final write waits for it (and is
    conditional on the version it wrote), so a stale `pending` never lands over `ok`."""
    import threading

    from capray.io import lease

    in_flight = threading.Event()
    real_renew = lease.Lease.renew

    def slow_renew(self):
        in_flight.set()
        time.sleep(0.3)  # the job finishes meanwhile
        return real_renew(self)

    monkeypatch.setattr(lease.Lease, "renew", slow_renew)

    async def protect(rgbs, cfg, identity, on_progress, fixed=()):
        on_progress(0, 2)
        while not in_flight.is_set():
            await asyncio.sleep(0.01)
        return [255 - a for a in rgbs], _record(len(rgbs), identity)

    async def scenario():
        from capray.serve.requests import decode_photos

        runner, store, cfg = _runner(tmp_path, protect, job_lease_s=0.6)
        sub = _submission()
        state = await runner.submit(sub, decode_photos(sub.files, sub.names, cfg.serve), cfg, owner="k1")
        settled = await _until_settled(runner, state.job_id)
        await asyncio.sleep(0.5)
        return settled, store.state(state.job_id), store

    settled, later, store = asyncio.run(scenario())
    assert settled.status == later.status == "ok" and later.holder == "r1" and _pending_ids(store) == []


def _long_protect(cancelled: list):
    async def protect(rgbs, cfg, identity, on_progress, fixed=()):
        on_progress(0, 2)
        try:
            await asyncio.sleep(60)  # a long group: only a cancellation ends it in time
        except asyncio.CancelledError:
            cancelled.append(identity)
            raise
        return [255 - a for a in rgbs], _record(len(rgbs), identity)

    return protect


async def _until_stopped(runner, job_id, timeout=10.0):
    deadline = time.monotonic() + timeout
    while job_id in runner.running and time.monotonic() < deadline:
        await asyncio.sleep(0.02)


def test_a_runner_whose_job_was_taken_over_writes_nothing_more(job_store):
    """Two replicas ran the same job: the one that lost it stops renewing, cancels its Protector call (which
    would otherwise run to the end for no one) and writes no outcome."""
    from capray.serve.requests import decode_photos

    cancelled = []

    async def scenario():
        runner, store, cfg = _runner(job_store, _long_protect(cancelled), job_lease_s=0.6)
        sub = _submission()
        state = await runner.submit(sub, decode_photos(sub.files, sub.names, cfg.serve), cfg, owner="k1")
        await asyncio.sleep(0.3)
        current = store.state(state.job_id)
        theirs = store.take_over(store.peek(state.job_id), _as(current, "r2", attempts=2), 60)
        assert theirs is not None  # another replica adopted it (this runner's lease looked expired to it)
        await _until_stopped(runner, state.job_id)
        return store.state(state.job_id), store

    after, store = asyncio.run(scenario())
    assert cancelled == ["alice"], "the runner that lost the job let its Protector call run on"
    assert (after.status, after.holder, after.attempts) == ("pending", "r2", 2) and store.photo(after.job_id, 0) is None


def _all_files(store) -> list[str]:
    return sorted(p for p in store.fs.find(store.root) if not p.rstrip("/").endswith("/"))


def test_a_job_deleted_on_another_replica_stops_its_runner_and_leaves_no_file(job_store):
    """DELETE answered by a replica that is not running the job: the runner's next renewal finds the status
    gone, it cancels its Protector call, and nothing of the job (markers, records, uploads) is left."""
    from capray.serve.requests import decode_photos
    from capray.serve.store import Idempotent, key_digest

    cancelled = []

    async def scenario():
        runner, store, cfg = _runner(job_store, _long_protect(cancelled), job_lease_s=0.6)
        sub = _submission()
        digest = key_digest("retry-1")
        record = Idempotent(job_id="c" * 32, request_digest="d", created_at=time.time())
        assert store.reserve("k1", digest, record) is None
        state = await runner.submit(sub, decode_photos(sub.files, sub.names, cfg.serve), cfg, owner="k1",
                                    job_id=record.job_id, idempotency_key=digest)
        await asyncio.sleep(0.3)
        before = _all_files(store)
        store.delete(state.job_id, "k1")  # as another replica's DELETE does: no access to this runner's task
        await _until_stopped(runner, state.job_id)
        return store, before

    store, before = asyncio.run(scenario())
    assert cancelled == ["alice"], "the runner of a deleted job let its Protector call run on"
    assert any("idempotency" in f for f in before) and any("/owners/" in f for f in before)
    assert any("/input/" in f for f in before) and any("/pending/" in f for f in before)
    assert _all_files(store) == [] and store.idempotent("k1", key_digest("retry-1")) is None


def test_a_job_deleted_while_its_results_are_written_leaves_none_of_them(tmp_path):
    """The runner checked its lease, then the job was deleted, then it wrote photos: they are removed."""
    store, state, claim = _stored_job(tmp_path, "e" * 32)
    real_check = claim.check

    def deleted_after_the_check():
        real_check()
        store.delete(state.job_id, "k1")

    claim.check = deleted_after_the_check
    finished = store.finish(claim, state.model_copy(), [(b"png", "png")], b"{}")
    assert not finished and _all_files(store) == []


def test_an_idempotency_key_has_one_record_and_an_owners_jobs_list_newest_first(tmp_path):
    from capray.serve.store import NEVER, Idempotent, JobRequest, JobState, JobStore, key_digest

    store = JobStore(str(tmp_path / "store"))
    first, second = (Idempotent(job_id=c * 32, request_digest=c, created_at=time.time()) for c in "ab")
    digest = key_digest("same-key")
    assert store.reserve("k1", digest, first) is None  # two concurrent first submits: one record wins
    assert store.reserve("k1", digest, second) == first
    assert store.reserve("k2", digest, second) is None  # another caller's key is another key
    stale = Idempotent(job_id="f" * 32, request_digest="x", created_at=time.time() - 3600)  # its submit died
    assert store.reserve("k3", digest, stale) is None and store.reserve("k3", digest, first) is None
    assert "same-key" not in " ".join(_all_files(store))  # the key itself is never stored
    ids = [f"{i:032x}" for i in range(5)]
    for i, job_id in enumerate(ids):  # created one second apart, in order
        state = JobState(job_id=job_id, owner="k1", created_at=1000 + i, updated_at=0, holder="r1")
        store.create(JobRequest(job_id=job_id, owner="k1", identity="x", names=[], config={}, created_at=1000 + i),
                     [], state, 60)
    pages, cursor = [], None
    for _ in range(5):
        page, cursor = store.jobs_of("k1", 2, cursor)
        pages.append([st.job_id for st in page])
        if cursor is None:
            break
    assert pages == [[ids[4], ids[3]], [ids[2], ids[1]], [ids[0]]]
    assert store.jobs_of("k2", 10) == ([], None) and NEVER > 1e15
    store.delete(ids[3], "k1")
    assert [st.job_id for st in store.jobs_of("k1", 10)[0]] == [ids[4], ids[2], ids[1], ids[0]]


def test_a_runner_that_cannot_renew_stops_in_time_and_the_job_is_run_elsewhere(job_store, monkeypatch):
    """The store stops answering this replica's renewals: it cancels its run before its lease can expire,
    writes nothing after, and another replica adopts the job once the lease has run out."""
    from capray.io import lease
    from capray.serve.requests import decode_photos

    cancelled = []

    def unreachable(self, data, etag):
        raise OSError("the store is unreachable from this replica")

    async def scenario():
        runner, store, cfg = _runner(job_store, _long_protect(cancelled), job_lease_s=1.2)
        sub = _submission()
        for backend in (lease.LocalBackend, lease.S3Backend):
            monkeypatch.setattr(backend, "replace", unreachable)
        state = await runner.submit(sub, decode_photos(sub.files, sub.names, cfg.serve), cfg, owner="k1")
        t0 = time.monotonic()
        await _until_stopped(runner, state.job_id)
        stopped_after = time.monotonic() - t0
        monkeypatch.undo()
        last = store.peek(state.job_id)
        other, _, _ = _runner(job_store, _invert, job_lease_s=1.2)
        other.tag = "r2"
        await asyncio.sleep(1.2 + _slack(job_store))
        assert store.peek(state.job_id).etag == last.etag, "the stopped runner wrote after giving up"
        await other.sweep()
        return stopped_after, await _until_settled(other, state.job_id)

    stopped_after, done = asyncio.run(scenario())
    assert cancelled == ["alice"] and stopped_after < 1.2, stopped_after
    assert (done.status, done.holder, done.attempts) == ("ok", "r2", 2)


def test_two_replicas_sweeping_at_once_run_an_expired_job_once(job_store):
    """Both replicas see the same expired lease; the conditional take-over lets exactly one run the job."""
    calls = []

    async def counted(rgbs, cfg, identity, on_progress, fixed=()):
        calls.append(identity)
        return await _invert(rgbs, cfg, identity, on_progress)

    async def scenario():
        from capray.config import ENGINE_SECTIONS
        from capray.serve.store import JobRequest, JobState

        job_id = "c" * 32
        _, store, cfg = _runner(job_store, counted)
        request = JobRequest(job_id=job_id, owner="k1", identity="x", names=["p0.png", "p1.png"], created_at=0,
                             config=cfg.model_dump(mode="json", include=set(ENGINE_SECTIONS)))
        state = JobState(job_id=job_id, owner="k1", created_at=0, updated_at=0, holder="gone", attempts=1)
        store.create(request, [_png(a) for a in PHOTOS], state, 1)  # by a runner that then vanished
        await asyncio.sleep(1 + _slack(job_store))
        replicas = []
        for tag in ("r2", "r3", "r4"):
            replica, _, _ = _runner(job_store, counted, job_lease_s=1)
            replica.tag = tag
            replicas.append(replica)
        await asyncio.gather(*(r.sweep() for r in replicas))
        runners = [r for r in replicas if job_id in r.running]
        assert len(runners) == 1, [r.tag for r in runners]
        return await _until_settled(runners[0], job_id)

    done = asyncio.run(scenario())
    assert calls == ["x"] and (done.status, done.attempts, done.generation) == ("ok", 2, 2)


@pytest.mark.s3
def test_a_replica_whose_clock_is_90_s_fast_adopts_no_live_job(s3_store, monkeypatch):
    """Expiry is judged by the store's clock: a fast replica does not take a running job away."""
    import types

    from capray.io import lease

    cancelled = []

    async def scenario():
        runner, store, cfg = _runner(s3_store, _long_protect(cancelled), job_lease_s=30)
        from capray.serve.requests import decode_photos

        sub = _submission()
        state = await runner.submit(sub, decode_photos(sub.files, sub.names, cfg.serve), cfg, owner="k1")
        fast = types.SimpleNamespace(time=lambda: time.time() + 90, monotonic=time.monotonic)
        monkeypatch.setattr(lease, "time", fast)
        other, _, _ = _runner(s3_store, _invert, job_lease_s=30)
        other.tag = "r2"
        await other.sweep()
        monkeypatch.setattr(lease, "time", time)
        adopted = state.job_id in other.running
        runner.running[state.job_id].cancel()
        await asyncio.sleep(0.05)
        return adopted, store.state(state.job_id)

    adopted, after = asyncio.run(scenario())
    assert not adopted and after.holder == "r1" and after.attempts == 1


def test_the_sweep_repairs_a_finish_cut_short_and_deletes_uploads_nobody_will_run(job_store, monkeypatch):
    """The two crash points of a job's life: between its final status and its markers (its photos must
    still expire), and inside `create` before its status (its uploaded faces must not stay forever)."""
    from capray.io import lease
    from capray.serve.store import JobRequest, JobState

    job_id, orphan_id = "d" * 32, "e" * 32
    store, state, claim = _stored_job(job_store, job_id)
    monkeypatch.setattr(type(store), "settle", lambda self, state: None)  # the replica dies right after the status
    assert store.finish(claim, state.model_copy(), [(b"png", "png")], b"{}")
    monkeypatch.undo()
    assert _pending_ids(store) == [job_id] and store.inputs(job_id, 1) == [b"photo"] and store.expired(0) == []

    def died(*_args, **_kwargs):
        raise ConnectionError("the replica died storing the job")

    monkeypatch.setattr(lease, "create", died)
    with pytest.raises(ConnectionError):
        store.create(JobRequest(job_id=orphan_id, owner="k1", identity="x", names=["p0"], config={}, created_at=0),
                     [b"face"], JobState(job_id=orphan_id, owner="k1", created_at=0, updated_at=0, holder="r1"), 1)
    monkeypatch.undo()
    assert store.inputs(orphan_id, 1) == [b"face"] and store.state(orphan_id) is None

    async def sweeps():
        runner, _, _ = _runner(job_store, _invert, job_lease_s=1, job_ttl_s=3600)
        await runner.sweep()
        assert _pending_ids(store) == [orphan_id], "an upload still within the lease time was deleted"
        await asyncio.sleep(1 + _slack(job_store))
        await runner.sweep()

    asyncio.run(sweeps())
    assert _pending_ids(store) == [] and store.state(job_id).status == "ok" and store.photo(job_id, 0) == b"png"
    with pytest.raises(FileNotFoundError):
        store.inputs(job_id, 1)  # the finished job's uploads are gone, and its marker now lets it expire
    assert [j for _, j in store.expired(-10)] == [job_id]
    with pytest.raises(FileNotFoundError):
        store.inputs(orphan_id, 1)
    assert store.request(orphan_id) is None


def test_a_jobs_stored_files_hold_no_storage_secret_and_no_api_key(tmp_path):
    """job.json keeps the engine settings a rerun needs, never the server's storage options or a caller's key;
    a rerun from it still gets the server's own settings back."""
    from capray.serve.auth import owner_id
    from capray.serve.requests import decode_photos

    secrets = ["AKIA-BATCH-KEY-0001", "batch-secret-value-0002", "alice-api-key-0003"]

    async def scenario():
        runner, store, cfg = _runner(tmp_path, _invert)
        runner.config = cfg.model_copy(update={"batch": cfg.batch.model_copy(update={
            "storage_options": {"key": secrets[0], "secret": secrets[1]}})})
        sub = _submission()
        job_cfg = runner.config  # as effective_config returns it: the server's config, with overrides
        state = await runner.submit(sub, decode_photos(sub.files, sub.names, cfg.serve), job_cfg,
                                    owner=owner_id(secrets[2]))
        await _until_settled(runner, state.job_id)
        return store, state, runner

    store, state, runner = asyncio.run(scenario())
    files = [p for p in (tmp_path / "store").rglob("*") if p.is_file()]
    assert any(p.name == "job.json" for p in files)
    for path in files:
        data = path.read_bytes()
        assert not [s for s in secrets if s.encode() in data], path
    rerun = runner.config.with_engine(store.request(state.job_id).config)
    assert rerun.batch.storage_options["key"] == secrets[0] and rerun.config_hash() == runner.config.config_hash()


def test_a_rerun_job_gets_its_fixed_photos_back_from_the_store(tmp_path):
    """A job holding published photos fixed is stored whole (photos, then fixed photos): a replica that
    adopts it after its runner was lost protects the same photos against the same fixed ones."""
    from dataclasses import replace

    calls = []

    async def protect(rgbs, cfg, identity, on_progress, fixed=()):
        calls.append(([a.tolist() for a in rgbs], [a.tolist() for a in fixed]))
        on_progress(1, 1)
        return [255 - a for a in rgbs], _record(len(rgbs), identity)

    async def scenario():
        from capray.serve.requests import decode_photos

        runner, store, cfg = _runner(tmp_path, protect, job_lease_s=0.3)
        sub = replace(_submission(PHOTOS[:1]), fixed_files=[_png(PHOTOS[1])])
        state = await runner.submit(sub, decode_photos(sub.files, sub.names, cfg.serve), cfg, owner="k1",
                                    held=decode_photos(sub.fixed_files, [], cfg.serve))
        await _until_settled(runner, state.job_id)
        assert store.request(state.job_id).fixed_count == 1
        lost = store.state(state.job_id).model_copy(update={"status": "pending", "holder": "gone",
                                                            "finished_at": None})
        request = store.request(state.job_id)
        store.delete(state.job_id, "k1")  # as if its first runner died before the outcome
        store.create(request, [_png(PHOTOS[0]), _png(PHOTOS[1])], lost, 0.3)
        await asyncio.sleep(0.4)
        await runner.sweep()
        return await _until_settled(runner, state.job_id)

    settled = asyncio.run(scenario())
    assert settled.status == "ok" and settled.attempts == 2
    first, rerun = calls
    assert first == rerun == ([PHOTOS[0].tolist()], [PHOTOS[1].tolist()])


def _png_array(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)))


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
    argv = ["--print-config", "--preset", "paper", "--set", "serve.min_replicas=1",
            "--set", "serve.store=s3://capray-serve/jobs", "--set", "serve.api_keys_file=/etc/capray/api-keys/keys"]
    assert command.run(parser.parse_args(argv)) == 0
    assert yaml.safe_load(capsys.readouterr().out) == yaml.safe_load(SERVE_YAML.read_text())


def test_capray_serve_refuses_a_public_address_without_keys(capsys, monkeypatch, tmp_path):
    """Checked before Ray starts: exit 2 and the reason, unless keys or allow_unauthenticated say otherwise."""
    import argparse

    from capray.serve import command

    monkeypatch.delenv("CAPRAY_API_KEYS", raising=False)
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    argv = ["--preset", "smoke", "--host", "0.0.0.0", "--set", "model.sd=tiny",
            "--set", f"model.tiny_cache_dir={tmp_path}", "--set", f"serve.api_keys_file={tmp_path / 'none'}"]
    assert command.run(parser.parse_args(argv)) == 2
    assert "no API keys configured" in capsys.readouterr().err


def test_capray_serve_starts_its_ray_with_the_proxy_body_limit(monkeypatch, tmp_path):
    """The proxy reads the guard from its node's environment: `capray serve` sets it before starting Ray."""
    import argparse
    import os

    import capray.cluster
    from capray.serve import body_limit, command

    class Started(Exception):
        pass

    def connect_ray(address):
        raise Started({name: os.environ.get(name) for name in body_limit.proxy_env(0)})

    for name in body_limit.proxy_env(0):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(capray.cluster, "connect_ray", connect_ray)
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    argv = ["--preset", "smoke", "--set", "model.sd=tiny", "--set", f"model.tiny_cache_dir={tmp_path}",
            "--set", "serve.allow_unauthenticated=true", "--set", "serve.max_request_bytes=1234567"]
    with pytest.raises(Started) as started:
        command.run(parser.parse_args(argv))
    assert started.value.args[0] == body_limit.proxy_env(1_234_567)


def _bare_protector(cfg, stuck_after_s: float = 60.0):
    """A Protector replica without Serve or models (the engine is monkeypatched)."""
    from capray.protector import Protector
    from capray.serve.app import ProtectorDeployment

    replica = ProtectorDeployment.func_or_class.__new__(ProtectorDeployment.func_or_class)
    replica.protector, replica.stuck_after_s = Protector(cfg, models=None), stuck_after_s
    replica.device_lock, replica.busy_since = asyncio.Lock(), None
    replica.sharding, replica.scoring_pool = cfg.sharding, None
    return replica


def test_an_abandoned_group_stops_at_the_next_pgd_step_and_frees_the_device(monkeypatch):
    """A job that timed out or lost its lease cancels its call: the engine ends at its next step instead of
    running the remaining steps for no one while every other group waits for the device."""
    import threading

    import capray.protector
    from capray.config import load_config
    from capray.serve.app import Abandoned

    steps_run, outcome = [], []

    def engine(rgbs, cfg, identity, models, step_done, evaluator_factory=None, fixed=None):
        try:
            for step in range(1, 101):  # 100 steps of 20 ms: 2 s if nobody stops it
                threading.Event().wait(0.02)
                steps_run.append(step)
                step_done(step, 100)
        except Abandoned as exc:
            outcome.append(exc)
            raise
        return [255 - a for a in rgbs], _record(len(rgbs), identity)

    monkeypatch.setattr(capray.protector, "protect_arrays", engine)
    cfg = load_config(preset="smoke")
    replica = _bare_protector(cfg)

    async def scenario():
        call = replica.protect([PHOTOS[0]], cfg.model_dump(mode="json"), "alice")
        assert (await call.__anext__())[0] == "progress"
        assert await call.__anext__() == ("progress", (1, 100))
        await call.aclose()  # the runner cancelled it
        for _ in range(100):
            if not replica.device_lock.locked():
                break
            await asyncio.sleep(0.01)
        assert not replica.device_lock.locked() and replica.busy_since is None

    asyncio.run(scenario())
    assert len(outcome) == 1 and len(steps_run) <= 3, steps_run  # stopped at the first step boundary after


def test_a_cancelled_protector_call_keeps_the_device_until_the_engine_really_stops(monkeypatch):
    """A timed-out job cancels its call, but the engine runs on to its step boundary: the next group must wait,
    and the health check must report a call stuck past the time limit so Serve replaces the replica."""
    import threading

    import capray.protector
    from capray.config import load_config

    release, started = threading.Event(), threading.Event()

    def engine(rgbs, cfg, identity, models, progress, evaluator_factory=None, fixed=None):
        started.set()
        progress(1, 4)
        release.wait(10)  # one long step: the device stays taken until it ends
        progress(2, 4)
        return [255 - a for a in rgbs], _record(len(rgbs), identity)

    monkeypatch.setattr(capray.protector, "protect_arrays", engine)
    cfg = load_config(preset="smoke")
    replica = _bare_protector(cfg, stuck_after_s=0.05)

    async def scenario():
        call = replica.protect([PHOTOS[0]], cfg.model_dump(mode="json"), "alice")
        total = cfg.attack.total_pgd_steps
        assert await call.__anext__() == ("progress", (0, total))  # the group has the device: its clock starts
        assert await call.__anext__() == ("progress", (1, 4))
        await call.aclose()  # the caller gave up (job timeout)
        await asyncio.sleep(0.1)
        assert replica.device_lock.locked() and started.is_set()
        with pytest.raises(RuntimeError, match="past serve.job_timeout_s"):
            replica.check_health()
        release.set()
        for _ in range(100):
            if not replica.device_lock.locked():
                break
            await asyncio.sleep(0.02)
        assert not replica.device_lock.locked() and replica.busy_since is None
        replica.check_health()
        events = [e async for e in replica.protect([PHOTOS[0]], cfg.model_dump(mode="json"), "alice")]
        assert events[:2] == [("progress", (0, total)), ("progress", (1, 4))]
        assert np.array_equal(events[-1][1][0][0], 255 - PHOTOS[0])
        release.set()  # the sync endpoint asks for no progress: the result is the only event
        quiet = [e async for e in replica.protect([PHOTOS[1]], cfg.model_dump(mode="json"), "alice", False)]
        assert [kind for kind, _ in quiet] == ["result"] and np.array_equal(quiet[0][1][0][0], 255 - PHOTOS[1])

    asyncio.run(scenario())
