"""The package installs, its C extension loads, and what it measures agrees with the OS."""

from __future__ import annotations

import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from _gil import python_ticks_during

import flashdesk
from flashdesk.engine import _kernels

REPO = Path(__file__).resolve().parent.parent
REQUIRED_FEATURES = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_bf16", "amx", "neon")


def _proc_cpuinfo_flags() -> set[str] | None:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return None


def test_subpackages_import():
    import flashdesk.app
    import flashdesk.engine
    import flashdesk.offload

    assert flashdesk.__version__
    for module in (flashdesk.engine, flashdesk.offload, flashdesk.app):
        assert module.__name__.startswith("flashdesk.")


def test_cpu_features_has_required_keys():
    features = _kernels.cpu_features()
    for key in REQUIRED_FEATURES:
        assert isinstance(features[key], bool), key
    assert features["logical_cores"] >= 1


@pytest.mark.skipif(_proc_cpuinfo_flags() is None, reason="no /proc/cpuinfo on this OS")
def test_cpu_features_agree_with_proc_cpuinfo():
    flags = _proc_cpuinfo_flags()
    features = _kernels.cpu_features()
    if platform.machine() in ("x86_64", "AMD64"):
        # /proc/cpuinfo lists what the kernel enabled, so it is the OS-aware truth to compare with.
        mapping = {
            "avx2": "avx2",
            "fma": "fma",
            "f16c": "f16c",
            "avx_vnni": "avx_vnni",
            "avx512f": "avx512f",
            "avx512bw": "avx512bw",
            "avx512vl": "avx512vl",
            "avx512_vnni": "avx512_vnni",
            "avx512_bf16": "avx512_bf16",
            "avx512_vbmi": "avx512vbmi",
            "amx_tile": "amx_tile",
            "amx_bf16": "amx_bf16",
            "amx_int8": "amx_int8",
        }
        for ours, theirs in mapping.items():
            assert features[ours] == (theirs in flags), ours
        assert features["neon"] is False
    elif platform.machine() in ("aarch64", "arm64"):
        assert features["neon"] is True
        assert features["dotprod"] == ("asimddp" in flags)
    import os

    assert features["logical_cores"] == os.cpu_count()


def test_read_bandwidth_is_plausible():
    gbps = _kernels.read_bandwidth(64 << 20, 1, 0.05)
    # Any machine that runs this reads RAM faster than 0.5 GB/s and slower than 10 TB/s.
    assert 0.5 < gbps < 10_000
    details = _kernels.read_bandwidth(64 << 20, 2, 0.05, details=True)
    assert details["passes"] >= 2
    assert details["best_gbps"] >= details["mean_gbps"] > 0
    assert details["threads"] == 2


def test_read_bandwidth_rejects_bad_arguments():
    with pytest.raises(ValueError, match="nbytes"):
        _kernels.read_bandwidth(100, 1)
    with pytest.raises(ValueError, match="min_seconds"):
        _kernels.read_bandwidth(1 << 20, 1, -1.0)


def test_read_bandwidth_releases_the_gil():
    """A Python thread keeps running while the kernel streams memory."""
    assert python_ticks_during(lambda: _kernels.read_bandwidth(32 << 20, 1, 0.5)) > 50


def test_version_subprocess():
    out = subprocess.run(
        [sys.executable, "-m", "flashdesk", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == f"flashdesk {flashdesk.__version__}"


def test_console_script_help():
    exe = shutil.which("flashdesk", path=str(Path(sys.executable).parent))
    assert exe, "the `flashdesk` console script is not installed next to this Python"
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, check=True)
    assert "usage: flashdesk" in out.stdout
    assert "info" in out.stdout


def test_info_json_subprocess():
    import json

    out = subprocess.run(
        [sys.executable, "-m", "flashdesk", "info", "--json", "--bandwidth-mib", "32"],
        capture_output=True,
        text=True,
        check=True,
    )
    report = json.loads(out.stdout)
    assert report["cpu_features"] == _kernels.cpu_features()
    assert report["read_bandwidth"]["best_gbps"] > 0


def test_wheel_installs_only_the_flashdesk_package(tmp_path):
    """Nothing bare (`app`, `engine`, `tests`) may land in site-packages."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        check=True,
        capture_output=True,
    )
    import zipfile

    (wheel,) = tmp_path.glob("flashdesk-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/", 1)[0] for n in names}
    assert tops <= {"flashdesk", f"flashdesk-{flashdesk.__version__}.dist-info"} | {
        t for t in tops if t.endswith(".dist-info")
    }
    assert any(n.startswith("flashdesk/engine/_kernels") for n in names)
    for sub in ("engine", "offload", "app"):
        assert f"flashdesk/{sub}/__init__.py" in names
