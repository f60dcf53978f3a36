"""What the frozen build leaves out, as rules on a file's path inside the onedir.

PyInstaller's hooks collect whole packages: torch brings its C++ headers, CMake files, test
binaries and test libraries; PySide6 brings every Qt translation and plugin that its modules can
use. The app needs none of those, so the spec drops them by path before anything is copied. The
rules are plain data plus `dropped(path)`, so they are tested without running a build.
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from pathlib import Path, PurePosixPath

# Qt plugins the app uses, by plugin folder (None: keep the whole folder). Everything else under
# PySide6/Qt/plugins is dropped.
QT_PLUGINS_KEPT: dict[str, tuple[str, ...] | None] = {
    # Windows, macOS, X11, Wayland, and offscreen (--self-test, --screenshot).
    "platforms": ("*qwindows*", "*qcocoa*", "*qxcb*", "*qwayland*", "*qoffscreen*"),
    "platformthemes": None,  # native file dialogs and colours (GTK, XDG portal)
    "platforminputcontexts": None,  # input methods (IBus, compose keys): typing CJK text
    "xcbglintegrations": None,
    "wayland-decoration-client": None,
    "wayland-graphics-integration-client": None,
    "wayland-shell-integration": None,
    "styles": None,  # macOS / Windows native styles
    "iconengines": ("*qsvgicon*",),  # the SVG window and button icons
    "imageformats": ("*qsvg*", "*qico*", "*qjpeg*"),
}

# Shell-style patterns on the whole destination path (posix separators).
DROPPED_PATTERNS: tuple[str, ...] = (
    # torch: headers, CMake files, static and import libraries, debug symbols, test binaries and
    # test libraries. Its Python sources stay: torch's config modules read their own source.
    "torch/include/*",
    "torch/share/*",
    "torch/test/*",
    "torch/bin/test_*",
    "torch/bin/protoc*",
    "torch/lib/*.a",
    "torch/lib/*.lib",
    "torch/lib/*.pdb",
    "torch/lib/*_test.*",
    "torch/lib/libbackend_with_compiler.*",
    "torch/lib/backend_with_compiler.*",
    "torch/lib/libaoti_custom_ops.*",
    "torch/lib/aoti_custom_ops.*",
    "torch/lib/libjitbackend_test.*",
    "torch/lib/jitbackend_test.*",
    # Qt: translations (the app installs no translator), QML, type metadata, Qt Quick and PDF
    # libraries pulled in only by plugins that are dropped below.
    "PySide6/Qt/translations/*",
    "PySide6/Qt/qml/*",
    "PySide6/Qt/metatypes/*",
    "PySide6/Qt/libexec/*",
    "PySide6/Qt/lib/libQt6Pdf*",
    "PySide6/Qt/lib/libQt6Quick*",
    "PySide6/Qt/lib/libQt6Qml*",
    "PySide6/Qt/lib/libQt6VirtualKeyboard*",
    "PySide6/Qt/lib/libQt6EglFS*",
    "PySide6/Qt/lib/libQt6EglFs*",
    "PySide6/Qt6Pdf*",
    "PySide6/Qt6Quick*",
    "PySide6/Qt6Qml*",
    # Anywhere: caches, type stubs, sources of C code.
    "*/__pycache__/*",
    "*.pyc",
    "*.pyi",
    "*.h",
    "*.hpp",
    "*.cuh",
    "*.cpp",
)


def _qt_plugin_dropped(parts: tuple[str, ...]) -> bool:
    """True for a file under .../Qt/plugins/<folder>/ (or PySide6/plugins on Windows) not kept."""
    for i, part in enumerate(parts[:-1]):
        if part == "plugins" and i >= 1 and parts[i - 1] in ("Qt", "PySide6"):
            if len(parts) <= i + 2:
                return False  # a file directly in plugins/: not a plugin
            folder, name = parts[i + 1], parts[-1]
            if folder not in QT_PLUGINS_KEPT:
                return True
            kept = QT_PLUGINS_KEPT[folder]
            return kept is not None and not any(fnmatchcase(name, pat) for pat in kept)
    return False


def dropped(dest: str) -> bool:
    """Whether the file that PyInstaller would copy to `dest` (relative to the onedir's
    contents folder) is left out of the build."""
    path = PurePosixPath(dest.replace("\\", "/"))
    text = str(path)
    if any(fnmatchcase(text, pat) for pat in DROPPED_PATTERNS):
        return True
    return _qt_plugin_dropped(path.parts)


def trim(toc: list[tuple], log: list[tuple[str, int]] | None = None) -> list[tuple]:
    """The TOC entries (dest, source, kind) that stay; dropped ones are appended to `log` with
    their source size in bytes."""
    import os

    kept = []
    for entry in toc:
        dest, source = entry[0], entry[1]
        if dropped(dest):
            if log is not None:
                size = os.path.getsize(source) if source and os.path.isfile(source) else 0
                log.append((dest, size))
        else:
            kept.append(entry)
    return kept


# Shared libraries shipped with their full symbol tables (libtorch_cpu.so carries ~90 MB of them).
# `strip --strip-unneeded` removes only what linking and loading never read; the dynamic symbols
# stay. Linux only, and only libraries that no auditwheel/patchelf step rewrote.
STRIPPED_ON_LINUX: tuple[str, ...] = (
    "torch/lib/libtorch_cpu.so",
    "torch/lib/libtorch_python.so",
    "torch/lib/libc10.so",
    "torch/lib/libshm.so",
)


def strip_symbols(contents: Path, strip: str = "strip") -> int:
    """Strip the libraries in STRIPPED_ON_LINUX under the onedir's contents folder; bytes saved."""
    import shutil
    import subprocess

    if shutil.which(strip) is None:
        print(f"trim: `{strip}` (binutils) is not installed; libraries keep their symbol tables")
        return 0
    saved = 0
    for rel in STRIPPED_ON_LINUX:
        lib = contents / rel
        if not lib.is_file():
            continue
        before = lib.stat().st_size
        subprocess.run([strip, "--strip-unneeded", str(lib)], check=True)
        saved += before - lib.stat().st_size
    return saved
