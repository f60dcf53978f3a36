"""Every Triton kernel compiles for a Hopper GPU (sm_90a), and for the RTX 30 and 40 series
(sm_86, sm_89), at V4-Flash's shapes with the default tiles, and spills no registers: Triton's
compiler and its wheel's `ptxas` need no GPU, so a kernel that would fail on the lent GPU
machine or a user's card, or run slowly from spilled registers, fails here first
(tests/_compile_kernels.py, in a process without Triton's interpreter)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flashdesk.engine import gpu_kernels

HERE = Path(__file__).parent


def test_every_kernel_compiles_for_hopper_and_desktop_gpus_without_spills():
    if gpu_kernels.triton is None:
        pytest.skip("Triton is not installed (`make test` installs it on Linux x86-64)")
    ptxas = Path(gpu_kernels.triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        pytest.skip(f"this Triton wheel has no ptxas ({ptxas}): it cannot build for NVIDIA here")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, str(HERE / "_compile_kernels.py")],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout)
    failed = {k: v["error"] for k, v in results.items() if "error" in v}
    assert not failed, failed
    spilled = {k: v for k, v in results.items() if v["spill_bytes"]}
    assert not spilled, spilled
    # the word-wise FP4 decode keeps its instruction count (10.4 / 8.6 per weight byte-wise)
    counts = {
        k: v["loop_instructions_per_weight"]
        for k, v in results.items()
        if "loop_instructions_per_weight" in v
    }
    assert counts["moe gate/up words"] < 6 and counts["moe down words"] < 6, counts
    # and the integer dots theirs (2.4 per weight: byte permutes and dp4a in inline PTX)
    assert counts["moe int8 gate/up"] < 3 and counts["moe int8 down"] < 3, counts
    assert counts["moe int8 gate/up joint"] < 3, counts
    # with programmatic dependent launch each waits for its predecessor; without, none does
    pdl = {k: v["waits"] for k, v in results.items() if k.endswith(", PDL")}
    assert len(pdl) == 5 and all(pdl.values()), pdl
    assert not any(v["waits"] for k, v in results.items() if k not in pdl)
    # the RTX 30 series' FP8 linears (code bytes) and the RTX 40's (fp8e4nv) built too
    for arch in ("sm_86", "sm_89"):
        assert f"linear rows wq_b K step 512 split 1 @ {arch}" in results
        assert f"moe gate/up @ {arch}" in results
    # every kernel of the module is in the list (a new one must be added there)
    kernels = {name for name in dir(gpu_kernels) if name.endswith("_kernel")}
    listed = (HERE / "_compile_kernels.py").read_text(encoding="utf-8")
    assert {k for k in kernels if f"gk.{k}" not in listed} == set()
    assert len(results) >= len(kernels)
