"""Who may open a phone call's media stream: per-call tokens and Twilio's request signature.

A media-stream websocket (``/ws``) that anyone can open would hand an engine slot to anyone who
knows the URL. The phone bot therefore answers the provider's call webhook itself: it checks
Twilio's signature on the webhook (``X-Twilio-Signature``, when ``TWILIO_AUTH_TOKEN`` is set),
mints a short-lived, single-use token for that call, and puts it where the provider sends it back
when it opens the stream (a ``<Parameter>`` of Twilio's ``<Stream>``, or the stream URL's path for
Telnyx and Plivo). A stream that does not bring a valid token is closed before a session opens.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import threading
import time
from collections.abc import Mapping
from xml.sax.saxutils import quoteattr

TOKEN_PARAMETER = "hertz_token"
"""The name of the ``<Stream>`` custom parameter that carries the token."""

XML_HEAD = '<?xml version="1.0" encoding="UTF-8"?>'

TOKEN_TTL_S = 300.0
"""A provider opens the stream seconds after the webhook; a token older than this is refused."""


class CallTokens:
    """Mints and checks single-use call tokens (HMAC-signed, with an expiry and maybe a call id).

    Args:
        secret: The signing key (a random one per process by default: tokens do not outlive it).
        ttl_s: How long a token stays valid.
    """

    def __init__(self, secret: bytes | None = None, ttl_s: float = TOKEN_TTL_S) -> None:
        self._secret = secret or secrets.token_bytes(32)
        self._ttl_s = ttl_s
        self._used: dict[str, float] = {}  # token -> expiry, to refuse a replay
        self._lock = threading.Lock()

    def _sign(self, body: str) -> str:
        return hmac.new(self._secret, body.encode(), hashlib.sha256).hexdigest()

    def mint(self, call_id: str = "") -> str:
        """A token for one stream of the call ``call_id`` ("" when the provider gives none)."""
        body = f"{time.time() + self._ttl_s:.0f}.{secrets.token_hex(8)}.{call_id}"
        return f"{body}.{self._sign(body)}"

    def consume(self, token: str | None, call_id: str = "") -> bool:
        """True, once, for a token this object minted for ``call_id`` that has not expired."""
        if not token or token.count(".") < 3:
            return False
        body, signature = token.rsplit(".", 1)
        expiry_text, _nonce, token_call = body.split(".", 2)
        if not hmac.compare_digest(self._sign(body), signature):
            return False
        try:
            expiry = float(expiry_text)
        except ValueError:
            return False
        now = time.time()
        if now > expiry or (token_call and token_call != call_id):
            return False
        with self._lock:
            for old in [t for t, e in self._used.items() if e < now]:
                del self._used[old]
            if token in self._used:
                return False
            self._used[token] = expiry
        return True


def twilio_signature(auth_token: str, url: str, params: Mapping[str, str]) -> str:
    """Twilio's ``X-Twilio-Signature`` of a POST to ``url`` with form ``params``.

    Twilio signs the full URL it requested followed by each POST parameter's name and value,
    sorted by name, with HMAC-SHA1 keyed by the account's auth token, in base64.
    """
    data = url + "".join(f"{key}{params[key]}" for key in sorted(params))
    digest = hmac.new(auth_token.encode(), data.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


def twilio_signature_valid(
    auth_token: str, url: str, params: Mapping[str, str], signature: str | None
) -> bool:
    """Whether ``signature`` is Twilio's for this request (constant-time comparison)."""
    return bool(signature) and hmac.compare_digest(
        twilio_signature(auth_token, url, params), signature or ""
    )


def stream_xml(provider: str, host: str, token: str) -> str:
    """The call webhook's answer: connect the call's audio to ``wss://host/ws`` with ``token``."""
    if provider == "twilio":
        parameter = f"<Parameter name={quoteattr(TOKEN_PARAMETER)} value={quoteattr(token)}/>"
        stream = f"<Stream url={quoteattr(f'wss://{host}/ws')}>{parameter}</Stream>"
        return f"{XML_HEAD}<Response><Connect>{stream}</Connect></Response>"
    url = f"wss://{host}/ws/{token}"  # Telnyx and Plivo: the token in the stream URL's path
    if provider == "telnyx":
        stream = f'<Stream url={quoteattr(url)} bidirectionalMode="rtp"></Stream>'
        return f"{XML_HEAD}<Response><Connect>{stream}</Connect></Response>"
    if provider == "plivo":
        stream = (
            '<Stream bidirectional="true" keepCallAlive="true" '
            'contentType="audio/x-mulaw;rate=8000">'
            f"{url}</Stream>"
        )
        return f"{XML_HEAD}<Response>{stream}</Response>"
    raise ValueError(f"no call webhook for {provider!r}: use twilio, telnyx or plivo")
