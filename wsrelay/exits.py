"""How a session's side ended, as a value: the first :class:`Exit` a session reports decides how it is settled."""

from dataclasses import dataclass

CLIENT_TO_UPSTREAM = "client_to_upstream"
UPSTREAM_TO_CLIENT = "upstream_to_client"
KEEPALIVE = "downstream_keepalive"


@dataclass(frozen=True)
class Exit:
    """How a session's first side ended.

    ``side`` is the connection that ended (``client`` or ``upstream``; the relay's own timers and shutdown end
    the client side).  ``close_code``/``close_reason``: for ``client_close`` and ``upstream_close`` the code the
    peer sent; for any other client-side end the close the relay sends the client (None: no close frame).
    """

    stage: str
    direction: str
    side: str
    graceful: bool
    error: str = None
    close_code: int = None
    close_reason: str = ""
    close_forwarded: bool = False
