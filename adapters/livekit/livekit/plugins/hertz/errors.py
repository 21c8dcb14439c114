"""hertz-agents' errors in LiveKit's ``APIError`` family.

``AgentSession`` logs an ``APIError`` as one line and anything else with its whole traceback, and
LiveKit's retry logic reads ``retryable``. None of these is retryable by the framework: a session
that failed is gone, and a new call opens a new one.
"""

from __future__ import annotations

from livekit.agents import APIConnectionError, APIError, APIStatusError

from hertz_agents.errors import CheckpointError, EngineFull, SessionClosed

# HTTP-like codes, so a log line or a dashboard groups them the way it groups other providers'
_ENGINE_FULL_STATUS = 503
_REFUSED_STATUS = 401


def api_error(error: BaseException) -> APIError:
    """The ``APIError`` that stands for ``error`` (itself if it already is one); keeps the cause."""
    if isinstance(error, APIError):
        return error
    message = str(error) or type(error).__name__
    result: APIError
    if isinstance(error, EngineFull):
        result = APIStatusError(message, status_code=_ENGINE_FULL_STATUS, retryable=False)
    elif isinstance(error, PermissionError):  # the server refused the token
        result = APIStatusError(message, status_code=_REFUSED_STATUS, retryable=False)
    elif isinstance(error, (ConnectionError, SessionClosed)):  # a server that is gone or away
        result = APIConnectionError(message, retryable=False)
    elif isinstance(error, CheckpointError):
        result = APIError(message, body={"kind": "checkpoint"}, retryable=False)
    else:
        result = APIError(message, retryable=False)
    result.__cause__ = error
    return result
