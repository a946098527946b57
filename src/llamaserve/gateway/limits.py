"""Turning the store's admission of a request into a refusal or OpenAI's rate-limit headers."""

from __future__ import annotations

from llamaserve.errors import AuthenticationFailed, PermissionDenied
from llamaserve.store.limits import Admission


def refuse_unless_admitted(admission: Admission) -> None:
    if admission.state == "disabled":
        raise PermissionDenied("This user is disabled.", code="user_disabled")
    if admission.state == "revoked":
        raise AuthenticationFailed("This API key has been revoked.", code="key_revoked")
    if admission.state == "expired":
        raise AuthenticationFailed("This API key has expired.", code="key_expired")


def rate_limit_headers(admission: Admission) -> list[tuple[bytes, bytes]]:
    if admission.limit == 0:
        return []
    return [
        (b"x-ratelimit-limit-requests", str(admission.limit).encode()),
        (b"x-ratelimit-remaining-requests", str(admission.remaining).encode()),
        (b"x-ratelimit-reset-requests", format_duration(admission.reset_seconds).encode()),
    ]


def format_duration(seconds: float) -> str:
    """OpenAI's style of duration: 20ms, 1.5s, 6m0s."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    minutes, secs = divmod(seconds, 60)
    if minutes < 1:
        return f"{secs:.3g}s"
    return f"{int(minutes)}m{int(secs)}s"
