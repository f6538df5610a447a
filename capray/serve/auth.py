"""Who may call the endpoint: API keys from `CAPRAY_API_KEYS` and/or `serve.api_keys_file`.

Keys are compared as SHA-256 digests in constant time and never stored or logged: a job records
its owner as a short digest of the key that created it (`owner_id`), so another key cannot read it.
The key file is a mounted Kubernetes Secret; it is re-read when its modification time changes, so
rotating a key needs no restart. A line is a key, optionally followed by the rights it has
(`KEY protect,read,delete`; default: all of them), e.g. a read-only key for a platform's download
worker. A request without a usable key gets 401 (RFC 6750); a known key without the right, 403.
With no keys at all, the endpoint is only safe on loopback: `check_exposure` refuses anything else
unless `serve.allow_unauthenticated` says otherwise.

Auth fails closed: once a key file is configured (or any key was ever loaded), a key file that goes
missing or empty (a deleted or badly rotated Secret) refuses every request (503) instead of opening
the endpoint to anyone; the exposure check runs only at startup, so it could not catch that.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import threading
import time

from capray.serve.problems import RequestError

ENV_VAR = "CAPRAY_API_KEYS"
ANONYMOUS = "anonymous"  # the owner of every job when no keys are configured
RIGHTS = ("protect", "read", "delete")  # submit jobs; read, list and download them; delete them


class AuthError(RequestError):
    """401 (no usable key), 403 (a known key without the right) or 503 (the server's keys are unreadable)."""


NO_KEYS = ("no API key can be read (serve.api_keys_file is missing or empty): every request is refused "
           "until it is restored")


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def owner_id(key: str) -> str:
    """The stored owner of a job: a digest of the key, never the key itself."""
    return "k" + hashlib.sha256(b"capray-owner:" + key.encode()).hexdigest()[:24]


def _parse(text: str, sep: str) -> dict[bytes, frozenset[str]]:
    """{key digest: its rights} from `sep`-separated entries `KEY [right,right…]` (# starts a comment line)."""
    keys = {}
    for entry in text.replace("\n", sep).split(sep):
        key, _, rights = entry.strip().partition(" ")
        if not key or key.startswith("#"):
            continue
        named = {r.strip() for r in rights.split(",") if r.strip()}
        unknown = named - set(RIGHTS)
        if unknown:
            raise ValueError(f"unknown API key rights {sorted(unknown)} (known: {', '.join(RIGHTS)})")
        keys[_digest(key)] = frozenset(named or RIGHTS)
    return keys


class KeyRing:
    """The current set of API keys (env + file), re-reading the file at most once per `recheck_s`."""

    def __init__(self, keys_file: str | None, env: str | None = None, recheck_s: float = 1.0):
        self.keys_file = keys_file
        self.env_keys = _parse(env if env is not None else os.environ.get(ENV_VAR, ""), ",")
        self.recheck_s = recheck_s
        self._file_keys: dict[bytes, frozenset[str]] = {}
        self._stamp: tuple[float, int] | None = None
        self._checked = -float("inf")
        self._lock = threading.Lock()
        self._reload(force=True)
        self.required = bool(self.keys_file or self.env_keys or self._file_keys)  # never anonymous once true

    def _reload(self, force: bool = False) -> None:
        if not self.keys_file or (not force and time.monotonic() - self._checked < self.recheck_s):
            return
        with self._lock:
            self._checked = time.monotonic()
            try:
                st = os.stat(self.keys_file)  # follows the Secret volume's ..data symlink swap
                stamp = (st.st_mtime, st.st_size)
                if stamp != self._stamp:
                    with open(self.keys_file, encoding="utf-8") as fh:
                        self._file_keys = _parse(fh.read(), "\n")
                    self._stamp = stamp
            except (OSError, ValueError):  # missing, unreadable or malformed: no file keys (refuses, never opens)
                self._file_keys, self._stamp = {}, None

    @property
    def configured(self) -> bool:
        self._reload()
        return bool(self.env_keys or self._file_keys)

    def authenticate(self, authorization: str | None, right: str | None = None) -> str:
        """The caller's owner id for an `Authorization` header value, or `AuthError`; `right`: what the
        route needs (one of RIGHTS)."""
        if not self.required:
            return ANONYMOUS
        if not self.configured:  # the keys file went missing or empty: refuse, do not fall back to anonymous
            raise AuthError("keys-unavailable", NO_KEYS, headers={"Retry-After": "30"})
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise AuthError("unauthorized", "missing API key: send 'Authorization: Bearer <key>'",
                            headers={"WWW-Authenticate": 'Bearer realm="capray"'})
        key = key.strip()
        digest = _digest(key)
        rights = None
        for known, granted in (self.env_keys | self._file_keys).items():
            if hmac.compare_digest(digest, known):
                rights = granted
        if rights is None:
            raise AuthError("invalid-key", "API key not accepted", headers={
                "WWW-Authenticate": 'Bearer realm="capray", error="invalid_token", '
                                    'error_description="the API key is not known to this server"'})
        if right is not None and right not in rights:
            raise AuthError("forbidden", f"this API key does not have the '{right}' right "
                                         f"(it has: {', '.join(sorted(rights)) or 'none'})")
        return owner_id(key)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, keys: KeyRing, allow_unauthenticated: bool) -> None:
    """Refuse (ValueError) to serve without keys on an address other machines can reach."""
    if keys.configured or allow_unauthenticated or is_loopback(host):
        return
    raise ValueError(
        f"no API keys configured, so the endpoint would accept anyone on {host}. Set {ENV_VAR} or "
        "serve.api_keys_file, listen on 127.0.0.1, or set serve.allow_unauthenticated=true to serve "
        "without authentication on purpose")
