"""The operator's credential: only LLAMA_ADMIN_API_KEY opens it, never a user's key."""

from __future__ import annotations

import pytest

from llamaserve.config import Settings
from llamaserve.errors import AuthenticationFailed, PermissionDenied
from llamaserve.gateway.admin import Operator

ADMIN = "adm-" + "k" * 40


def test_only_the_admin_key_opens_it() -> None:
    operator = Operator(Settings(llama_admin_api_key=ADMIN).admin_key())
    operator.check(f"Bearer {ADMIN}".encode())
    with pytest.raises(AuthenticationFailed):
        operator.check(None)
    with pytest.raises(AuthenticationFailed):
        operator.check(f"Bearer {ADMIN}x".encode())
    with pytest.raises(PermissionDenied):
        operator.check(b"Bearer lsk_0123456789_" + b"a" * 43)


@pytest.mark.parametrize("key", ["", "CHANGE_ME_PLEASE_NOW", "short-key"])
def test_without_a_usable_admin_key_nobody_is_an_operator(key: str) -> None:
    operator = Operator(Settings(llama_admin_api_key=key).admin_key())
    assert not operator.enabled
    for presented in (key, "", "CHANGE_ME_PLEASE_NOW"):
        assert not operator.matches(presented)
