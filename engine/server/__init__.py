"""FlashDesk's local OpenAI-compatible server (off by default, loopback only unless chosen).

    handle = start_server(provider, host="127.0.0.1", port=DEFAULT_PORT, api_key=None)
    ... clients use handle.url (http://127.0.0.1:8437/v1) ...
    handle.stop()

`provider()` returns the loaded model as a `ServedModel` (or None when nothing is loaded); it is
called per request, so the app can load and unload models while the server runs. No Qt here: the
app starts and stops the server from its settings.
"""

from .app import DEFAULT_MAX_BODY_BYTES, ServerOptions, create_app
from .generation import GenerationQueue, QueueFullError, ServedModel
from .runner import DEFAULT_PORT, ServerHandle, ServerStartError, start_server, warn_if_exposed

__all__ = [
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_PORT",
    "GenerationQueue",
    "QueueFullError",
    "ServedModel",
    "ServerHandle",
    "ServerOptions",
    "ServerStartError",
    "create_app",
    "start_server",
    "warn_if_exposed",
]
