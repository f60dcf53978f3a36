"""Start and stop the server on a background thread: what the app's settings toggle and
`flashdesk serve` call.

The socket is bound here, before the thread starts, so a port that is taken or a host that does
not exist is reported to the caller at once instead of in a log.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import threading
from collections.abc import Callable

import uvicorn

from . import DEFAULT_PORT
from .app import ServerOptions, create_app, is_loopback
from .generation import GenerationQueue, ServedModel


class ServerStartError(RuntimeError):
    """The server could not start; the message says why and what to do."""


class ServerHandle:
    """A running server. `stop()` cancels what is generating and closes the socket."""

    def __init__(
        self,
        server: uvicorn.Server,
        thread: threading.Thread,
        queue: GenerationQueue,
        host: str,
        port: int,
    ):
        self._server = server
        self._thread = thread
        self._queue = queue
        self.host = host
        self.port = port

    @property
    def url(self) -> str:
        """The base URL for OpenAI clients (`base_url`), e.g. http://127.0.0.1:8437/v1."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"

    @property
    def pending(self) -> int:
        """Requests generating or waiting (for a status line: "server: 2 requests")."""
        return self._queue.pending

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server has stopped (True) or `timeout` passed (False)."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving: cancel generations (they end within one token), close connections."""
        self._queue.close()
        self._server.should_exit = True
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._server.force_exit = True
            self._thread.join(timeout)


def _bind(host: str, port: int) -> socket.socket:
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:  # a host name: resolve it
        try:
            family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        except socket.gaierror as exc:
            raise ServerStartError(
                f"Cannot listen on {host!r}: the name does not resolve ({exc.strerror}). Use "
                "127.0.0.1 (this machine only) or an address of this machine."
            ) from exc
    # IPPROTO_TCP explicitly: asyncio turns Nagle off only on sockets that say they are TCP, and
    # Nagle + delayed ACK costs 40 ms per keep-alive response.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ServerStartError(
                f"Port {port} on {host} is already in use (another server is running there). "
                "Stop it, or choose another port (--port, or the port field in Settings)."
            ) from exc
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise ServerStartError(
                f"Not allowed to listen on port {port}: ports below 1024 need administrator "
                "rights. Choose a port of 1024 or more."
            ) from exc
        raise ServerStartError(
            f"Cannot listen on {host}:{port}: {exc.strerror or exc}. Check the address is one of "
            "this machine's."
        ) from exc
    sock.listen(128)
    sock.setblocking(False)
    return sock


def start_server(
    provider: Callable[[], ServedModel | None],
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    api_key: str | None = None,
    *,
    max_waiting: int = 4,
    max_body_bytes: int | None = None,
    options: ServerOptions | None = None,
    log_level: str = "warning",
) -> ServerHandle:
    """Serve `provider()`'s model on `host:port` from a background thread; returns at once.

    provider: called for every request; returns the loaded model or None (requests get 503).
    port: 0 picks a free port (tests); `handle.port` tells which.
    api_key: when set, every request must send `Authorization: Bearer <api_key>`.
    Raises ServerStartError (port in use, bad host) before anything runs.
    """
    if options is None:
        extra = {} if max_body_bytes is None else {"max_body_bytes": max_body_bytes}
        options = ServerOptions(
            host=host, port=port, api_key=api_key or None, max_waiting=max_waiting, **extra
        )
    if not 0 <= options.port <= 65535:
        raise ServerStartError(f"Port {options.port} is not a TCP port; use 1024-65535.")
    sock = _bind(options.host, options.port)
    bound_port = sock.getsockname()[1]
    queue = GenerationQueue(options.max_waiting)
    app = create_app(provider, options, queue)
    config = uvicorn.Config(
        app,
        log_level=log_level,
        access_log=False,
        lifespan="off",
        http="h11",
        ws="none",
        loop="asyncio",
        timeout_keep_alive=5,
        timeout_graceful_shutdown=2,
        limit_concurrency=256,
        server_header=False,
    )
    server = uvicorn.Server(config)
    started = threading.Event()
    failure: list[BaseException] = []

    def serve() -> None:
        try:
            server.run(sockets=[sock])
        except BaseException as exc:  # reported by start_server below, or logged by uvicorn
            failure.append(exc)
        finally:
            started.set()
            sock.close()

    thread = threading.Thread(target=serve, name=f"flashdesk-server-{bound_port}", daemon=True)
    thread.start()
    # Wait for the first accept-ready moment (or a failure) so callers can connect right away.
    while not started.wait(0.01):
        if server.started:
            break
    if failure or not thread.is_alive():
        queue.close()
        raise ServerStartError(
            f"The server on {options.host}:{bound_port} failed to start: "
            f"{failure[0] if failure else 'it exited at once'}."
        )
    return ServerHandle(server, thread, queue, options.host, bound_port)


def warn_if_exposed(host: str) -> str | None:
    """A warning to show when the user binds beyond loopback; None for loopback."""
    if is_loopback(host):
        return None
    return (
        f"The server listens on {host}: other machines on your network can reach it. Set an API "
        "key (--api-key) and make sure your firewall allows only machines you trust."
    )
