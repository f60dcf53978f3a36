"""FlashDesk: DeepSeek-V4-Flash on one desktop machine, split between a GPU and system RAM.

The subpackages are `flashdesk.engine` (model and runtime, no Qt), `flashdesk.offload` (hardware
probe and placement plan, no torch needed) and `flashdesk.app` (the PySide6 desktop app).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("flashdesk")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"

__all__ = ["__version__"]
