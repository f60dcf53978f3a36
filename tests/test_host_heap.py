"""The host heap keeps large blocks: a worker thread's 100 MB block comes from the main heap
(whose freed pages the next block reuses), not from a fresh mmap that is unmapped at free."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from flashdesk.engine import host_heap

# In a child process (the settings are process-wide and cannot be undone): apply them or not,
# then malloc 100 MB on a worker thread twice and say whether each block lies in [heap] and
# whether the second reused the first's address.
_CHILD = r"""
import ctypes, json, sys, threading
from flashdesk.engine import host_heap
applied = host_heap.keep_large_blocks() if sys.argv[1] == "1" else False
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)

def heap_range():
    with open("/proc/self/maps") as maps:
        for line in maps:
            if line.rstrip().endswith("[heap]"):
                lo, hi = line.split()[0].split("-")
                return int(lo, 16), int(hi, 16)
    return 0, 0

out = {"applied": applied, "in_heap": [], "addresses": []}
def work():
    for _ in range(2):
        p = libc.malloc(100 << 20)
        ctypes.memset(p, 1, 100 << 20)
        lo, hi = heap_range()
        out["in_heap"].append(lo <= p < hi)
        out["addresses"].append(p)
        libc.free(p)
t = threading.Thread(target=work)
t.start()
t.join()
host_heap.release()
print(json.dumps(out))
"""

glibc_only = pytest.mark.skipif(
    host_heap._glibc() is None,
    reason="the heap settings are glibc's (Linux); this C library has none",
)


def _child(apply: bool, **env) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    clean.pop("GLIBC_TUNABLES", None)
    clean.pop("FLASHDESK_KEEP_HEAP", None)
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, "1" if apply else "0"],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@glibc_only
def test_worker_threads_large_blocks_come_from_the_heap_and_are_reused():
    kept = _child(True)
    assert kept["applied"] is True
    assert kept["in_heap"] == [True, True]
    assert kept["addresses"][0] == kept["addresses"][1]  # the freed block's pages again


@glibc_only
def test_without_the_setting_they_are_fresh_mappings():
    """The control: glibc's defaults map the worker's block outside the heap (the reason for
    the module); if a future glibc stops doing that, the module is moot and this says so."""
    plain = _child(False)
    assert plain["applied"] is False
    assert plain["in_heap"] == [False, False]


@glibc_only
@pytest.mark.parametrize(
    "env",
    [
        {"MALLOC_ARENA_MAX": "2"},
        {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"},
        {"FLASHDESK_KEEP_HEAP": "0"},
    ],
)
def test_a_users_own_setting_wins(env):
    out = _child(True, **env)
    assert out["applied"] is False
    assert out["in_heap"] == [False, False]


def test_user_tuned_names_the_variable(monkeypatch):
    for name in [n for n in os.environ if n.startswith("MALLOC_")] + ["GLIBC_TUNABLES"]:
        monkeypatch.delenv(name, raising=False)
    assert host_heap.user_tuned() is None
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.rtld.nns=2")  # not the allocator's
    assert host_heap.user_tuned() is None
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "0")
    assert host_heap.user_tuned() == "MALLOC_TRIM_THRESHOLD_"


def test_the_command_applies_it_first(monkeypatch):
    """Every entry point (the app, the CLI, the frozen builds) goes through `cli.main`, which
    must set the heap up before anything starts a thread."""
    from flashdesk import cli

    calls = []
    monkeypatch.setattr(host_heap, "keep_large_blocks", lambda: calls.append(1) or True)
    with pytest.raises(SystemExit):
        cli.main(["--version"])
    assert calls == [1]
