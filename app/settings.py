"""User settings, kept as a small JSON file in the data folder.

JSON rather than QSettings so the file is the same on every OS, readable, and lives in portable mode's
folder with the rest. A damaged file is set aside (renamed, logged) and defaults are used: a
settings problem must never stop the app from opening.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("flashdesk.app.settings")

SETTINGS_NAME = "settings.json"
MODES = ("Non-think", "Think High", "Think Max")
THINK_MAX_MIN_CONTEXT = 384 * 1024


@dataclass
class Settings:
    model_path: str = ""  # a V4 checkpoint folder; empty: the tiny test model
    plan: dict[str, Any] = field(default_factory=dict)  # saved by the fit wizard
    context_limit: int = 8192  # tokens; the wizard's context slider
    mode: str = "Non-think"
    temperature: float = 1.0  # model card's recommendation
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 512
    seed: int | None = None
    system_prompt: str = ""
    theme: str = "system"  # follows the system palette
    wizard_done: bool = False
    api_server: bool = False  # the local OpenAI-compatible server; off unless the user turns it on
    api_port: int = 8437  # engine.server.DEFAULT_PORT (not imported: settings stay light)
    api_key: str = ""  # empty: no key required (the server listens on loopback only)

    @classmethod
    def load(cls, folder: Path) -> Settings:
        path = Path(folder) / SETTINGS_NAME
        if not path.exists():
            return cls()
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(raw, dict):
                raise ValueError("top level is not an object")
        except (OSError, ValueError) as exc:
            aside = path.with_suffix(".json.broken")
            log.warning(
                "settings file %s unreadable (%s); moved to %s, using defaults", path, exc, aside
            )
            with contextlib.suppress(OSError):
                os.replace(path, aside)
            return cls()
        known = {f.name: f for f in dataclasses.fields(cls)}
        values = {}
        for key, value in raw.items():
            if key in known:
                values[key] = value
            else:
                log.info("ignoring unknown setting %r", key)
        settings = cls(**values)
        if settings.mode not in MODES:
            settings.mode = "Non-think"
        return settings

    def save(self, folder: Path) -> None:
        """Atomic write: a crash mid-save leaves the previous file intact."""
        path = Path(folder) / SETTINGS_NAME
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(self), indent=2), encoding="utf-8")
        os.replace(tmp, path)
