"""A hertz server used as a backend: the remote client, its transport and the wire protocol.

``RemoteEngine`` satisfies ``hertz_agents.backend.Backend``, so ``DuplexSession``, the adapters
and anything else above the seam work on a server exactly as on a local engine. The server
(``hertz_agents.server``) imports the wire protocol from here; nothing here imports the server.
"""

from hertz_agents.remote.client import RemoteEngine, RemoteHandle
from hertz_agents.remote.transport import (
    TOKEN_ENV,
    AuthenticationFailed,
    ReconnectPolicy,
    ServerAddress,
    ServerGone,
    ServerUnavailable,
)

__all__ = [
    "TOKEN_ENV",
    "AuthenticationFailed",
    "ReconnectPolicy",
    "RemoteEngine",
    "RemoteHandle",
    "ServerAddress",
    "ServerGone",
    "ServerUnavailable",
]
