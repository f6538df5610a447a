"""The request-body limit at Ray Serve's HTTP proxy, before the proxy queues a body byte for a replica.

Why in the proxy: Serve's proxy drains each request body into an unbounded queue as fast as the socket
delivers it, and the ingress replica pulls that queue over RPC; a limit checked only in the ingress comes
after the proxy has read 50–100 MiB of a fast 300 MB upload. `BodyLimit` runs inside every node's proxy
(Ray's hook `RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`, read when a node's proxy starts, so it is set in
the node's environment: `capray serve` does it for the Ray it starts, `k8s/` on every pod) and answers 413
the moment the bytes pass the limit. The proxy is then told the client left, so the replica's request is
cancelled and nothing more is read from the socket (uvicorn pauses reading when nobody receives).

The ingress keeps its own check (`limits.guarded_receive`) for a cluster started without the hook; its
replicas warn when their node lacks it (`missing_guard`).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.datastructures import Headers
from starlette.middleware import Middleware

from capray.serve.limits import RequestError, check_declared_length, too_large
from capray.serve.problems import MEDIA_TYPE

CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
LIMIT_ENV = "CAPRAY_PROXY_MAX_REQUEST_BYTES"
CALLBACK = "capray.serve.body_limit:proxy_middlewares"

Message = dict[str, Any]


def proxy_env(limit: int) -> dict[str, str]:
    """The node environment that installs the guard with `limit` bytes (= `serve.max_request_bytes`)."""
    return {CALLBACK_ENV: CALLBACK, LIMIT_ENV: str(limit)}


def proxy_middlewares() -> list[Middleware]:
    """Ray's proxy callback: the middlewares every HTTP proxy on this node wraps its app in."""
    return [Middleware(BodyLimit, limit=int(os.environ[LIMIT_ENV]))]


def missing_guard(limit: int, environ: dict[str, str] | None = None) -> str | None:
    """Why this node's proxy does not refuse bodies over `limit` early, or None when it does."""
    env = os.environ if environ is None else environ
    if env.get(CALLBACK_ENV) != CALLBACK or not env.get(LIMIT_ENV, "").isdigit():
        return (f"this Ray node was started without the proxy body limit ({CALLBACK_ENV}={CALLBACK}, "
                f"{LIMIT_ENV}={limit}): oversized bodies are refused by the ingress only, after Serve's proxy "
                "has buffered tens of MiB of them")
    if int(env[LIMIT_ENV]) > limit:
        return f"the proxy body limit {env[LIMIT_ENV]} is above serve.max_request_bytes={limit}"
    return None


class BodyLimit:
    """Pure ASGI middleware: 413 for a body over `limit` bytes, by its Content-Length or while it streams."""

    def __init__(self, app: Callable[..., Awaitable[None]], limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Callable[[], Awaitable[Message]],
                       send: Callable[[Message], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        try:
            check_declared_length(Headers(scope=scope), self.limit)  # the ingress's own rule, from the header
        except RequestError as refused:
            return await self.refuse(send, refused)
        seen, answered, started = 0, False, False

        async def counted_receive() -> Message:
            nonlocal seen, answered
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    if started:  # the app is already answering: stop reading and let that answer finish
                        await asyncio.Event().wait()  # cancelled by the proxy once the response is sent
                    answered = True
                    await self.refuse(send, too_large(self.limit))
                    return {"type": "http.disconnect"}  # the proxy cancels the replica's request
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if answered:  # the 413 was the answer; drop the proxy's own reply to the "disconnect"
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, counted_receive, guarded_send)

    @staticmethod
    async def refuse(send: Callable[[Message], Awaitable[None]], refused: RequestError) -> None:
        """Answer with a `RequestError` as the problem+json of every other refusal, and close the connection."""
        body = refused.encoded()
        await send({"type": "http.response.start", "status": refused.status, "headers": [
            (b"content-type", MEDIA_TYPE.encode()), (b"content-length", str(len(body)).encode()),
            (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})
