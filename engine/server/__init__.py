"""FlashDesk's local OpenAI-compatible server (off by default, loopback only unless chosen).

    handle = start_server(provider, host="127.0.0.1", port=DEFAULT_PORT, api_key=None)
    ... clients use handle.url (http://127.0.0.1:8437/v1) ...
    handle.stop()

`provider()` returns the loaded model as a `ServedModel` (or None when nothing is loaded); it is
called per request, so the app can load and unload models while the server runs. No Qt here: the
app starts and stops the server from its settings.

The names load lazily, so `DEFAULT_PORT` can be read (CLI help, settings) without importing torch
or the web framework.
"""

from __future__ import annotations

import importlib

# Used by none of Ollama (11434), LM Studio (1234), llama.cpp (8080), Jan (1337), GPT4All (4891),
# KoboldCpp (5001), text-generation-webui (5000), vLLM/SGLang (8000/30000).
DEFAULT_PORT = 8437

_LAZY = {
    "DEFAULT_MAX_BODY_BYTES": "app",
    "ServerOptions": "app",
    "create_app": "app",
    "GenerationQueue": "generation",
    "QueueFullError": "generation",
    "ServedModel": "generation",
    "ServerHandle": "runner",
    "ServerStartError": "runner",
    "start_server": "runner",
    "warn_if_exposed": "runner",
}

__all__ = ["DEFAULT_PORT", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        module = importlib.import_module(f"{__name__}.{_LAZY[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
