"""Where ``kimivl serve`` answers: its sockets, opened before the model loads, and uvicorn's server on them."""

from __future__ import annotations

import logging
import socket

import uvicorn


def open_sockets(host: str, port: int) -> list[socket.socket]:
    """Sockets listening on ``host:port``, one per address the host resolves to (as uvicorn binds a host), or the
    ``OSError`` of the first that cannot be opened (every one opened is closed again). Opened before the model loads
    (minutes for the A3B), they hold the port: no other server can take it meanwhile, and a connection made during the
    load waits in the backlog until the server answers."""
    held = []
    try:
        for family, kind, proto, _, address in set(
            socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        ):
            sock = socket.socket(family, kind, proto)
            held.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen()
    except OSError:
        for sock in held:
            sock.close()
        raise
    return held


class PreboundServer(uvicorn.Server):
    """uvicorn's server, run on ``open_sockets``' sockets (``run(sockets=...)``), saying where it answers once it does:
    uvicorn says so only for the sockets it opens itself."""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        for sock in sockets or ():
            host, port = sock.getsockname()[:2]
            shown = f"[{host}]" if ":" in host else host
            logging.getLogger("uvicorn.error").info("answering on http://%s:%d (press Ctrl+C to stop)", shown, port)
