"""Bearer-token checks for the server, in constant time.

A token may come as ``Authorization: Bearer <token>`` (preferred: it stays out of URLs and
logs), as a ``?token=`` query parameter (browsers cannot set WebSocket headers), or as the
``/t/<token>/`` path prefix of the compatibility endpoint (original hertz-dev clients can only
be given a base URL).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os

from hertz_agents.remote.transport import TOKEN_ENV

__all__ = ["MIN_TOKEN_LENGTH", "TOKEN_ENV", "TokenAuth", "is_loopback", "resolve_token"]

MIN_TOKEN_LENGTH = 16


def _digest(token: str) -> bytes:
    # Comparing fixed-size digests keeps even the token's length out of the timing.
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


class TokenAuth:
    """Checks presented tokens against one configured token (or allows everything when None)."""

    def __init__(self, token: str | None) -> None:
        if token is not None and (len(token) < MIN_TOKEN_LENGTH or any(c.isspace() for c in token)):
            raise ValueError(
                f"the server token must be at least {MIN_TOKEN_LENGTH} characters without "
                "spaces; "
                "make one with `python -c 'import secrets; print(secrets.token_urlsafe(32))'`"
            )
        self._digest = _digest(token) if token is not None else None

    @property
    def required(self) -> bool:
        """A token is configured."""
        return self._digest is not None

    def check(self, presented: str | None) -> bool:
        """True when ``presented`` is the token (always True when no token is configured)."""
        if self._digest is None:
            return True
        # Always compare, even when nothing was presented, so both paths cost the same.
        return hmac.compare_digest(_digest(presented or ""), self._digest) and presented is not None

    def check_request(self, headers, query, path_token: str | None = None) -> bool:
        """Look for the token in the Authorization header, the ``token`` query or the path."""
        presented = path_token
        auth = headers.get("Authorization", "")
        if auth[:7].lower() == "bearer ":
            presented = auth[7:].strip()
        elif "token" in query:
            presented = query.get("token")
        return self.check(presented)


def is_loopback(host: str) -> bool:
    """True when ``host`` only listens on this machine (127.0.0.0/8, ::1, localhost)."""
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost: it may resolve anywhere, so no
        return False


def resolve_token(token: str | None, token_file: str | None) -> str | None:
    """The token from ``--token``, ``--token-file`` or the HERTZ_TOKEN environment variable."""
    if token_file:
        with open(token_file, encoding="utf-8") as f:
            return f.read().strip() or None
    return token or os.environ.get(TOKEN_ENV) or None
