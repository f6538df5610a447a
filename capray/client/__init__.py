"""`capray.client`: a Python client of the capray endpoint (submit, wait, download), and `capray submit`.

    from capray.client import Client

    with Client("http://127.0.0.1:8000") as client:  # the key comes from $CAPRAY_API_KEY
        result = client.protect(["a.jpg", "b.jpg"], identity="alice", delete=True)
        result.save("protected/")
"""

from __future__ import annotations

from capray.client.api import Client, Job, protect
from capray.client.errors import (
    ApiError,
    AuthenticationError,
    CaprayError,
    JobFailed,
    NotFound,
    PermissionDenied,
    RequestRefused,
    ServerBusy,
    TransportError,
    WaitTimeout,
)
from capray.client.results import ProtectedPhoto, ProtectResult

__all__ = ["Client", "Job", "protect", "ProtectedPhoto", "ProtectResult", "CaprayError", "ApiError",
           "AuthenticationError", "PermissionDenied", "NotFound", "RequestRefused", "ServerBusy", "JobFailed",
           "WaitTimeout", "TransportError"]
