"""Kernel shapes recorded per GPU model (engine/gpu_tuning.py) and applied by gpu_kernels."""

from __future__ import annotations

import json

import pytest
import torch

from flashdesk.engine import gpu_kernels, gpu_tuning

H200 = {
    "TILES": (8, 256, 8, 256),
    "WARPS": 4,
    "FP4_MODE": (2, 0, 1),  # the word-wise decode
    "FP4_STAGES": 3,
    "DECODE_MOE": "by pick",
    "GROUPED_TILES": (64, 64, 64),
    "LINEAR_KIND": "dot",
    "LINEAR_STAGES": None,
    "LINEAR_MIN_PROGRAMS": 0,
    "DECODE_HEAD_ROWS_PER_SPLIT": 0,  # by the layer's rows
    "LINEAR_ROWS_BY_SHAPE": {
        (1024, 4096, 1, 1): (8, 4, 1024, 0),
        (256, 4096, 1, 2): (4, 4, 2048, 0),
    },
}


def test_recorded_shapes_come_back_per_gpu(tmp_path):
    path = tmp_path / "gpu_kernels.json"
    gpu_tuning.record("NVIDIA H200", H200, "bench", path)
    gpu_tuning.record("NVIDIA GeForce RTX 4090", {"WARPS": 8, "FP4_MODE": (4, 0, 1)}, "bench",
                      path)  # fmt: skip
    assert gpu_tuning.load("NVIDIA H200", path) == H200
    # the integer dots (MODE 4) are a recordable choice
    assert gpu_tuning.load("NVIDIA GeForce RTX 4090", path) == {"WARPS": 8, "FP4_MODE": (4, 0, 1)}
    assert gpu_tuning.load("NVIDIA A100", path) == {}
    assert json.loads(path.read_text())["NVIDIA H200"]["note"] == "bench"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("TILES", (8, 256)),  # too short
        ("WARPS", "4"),
        ("DECODE_MOE", "fastest"),
        ("LINEAR_ROWS", (16, True)),
        ("GROUPED_TILES", (32, -64, 64)),
        ("GROUPED_TILES", (8, 64, 64)),  # tensor-core tiles: 16 rows at least
        ("TILES", (8, 0, 8, 256)),  # 0 rows per step would divide by zero
        ("WARPS", 6),  # not a power of two
        ("FP4_MODE", (0, 2, 0)),
        ("FP4_MODE", (3, 1, 1)),  # MODE 0-2 and 4 (MODE 3 lost on the H200 and is gone)
        ("FP4_UNROLL", 2),  # MODE 3's, recorded by older sweeps
        ("LINEAR_STAGES", 0),
        ("FP4_STAGES", 0),
        ("DECODE_ROWS_PER_SPLIT", 8),  # whole 16-row blocks
        ("DECODE_ROWS_PER_SPLIT", 0),  # "by the rows" is the head groups' alone
        ("DECODE_HEAD_ROWS_PER_SPLIT", 8),
        ("INTERPRETED", True),  # not a shape
        ("LINEAR_ROWS_BY_SHAPE", {"1024x4096": [8, 4, 1024, 0]}),  # N x K x groups x bytes
        ("LINEAR_ROWS_BY_SHAPE", {"1024x4096x1x1": [8, 3, 1024, 0]}),  # 3 warps
        ("LINEAR_ROWS_BY_SHAPE", [8, 4, 1024, 0]),  # not per shape
    ],
)
def test_what_does_not_fit_is_refused_and_skipped(tmp_path, name, value):
    path = tmp_path / "gpu_kernels.json"
    with pytest.raises(ValueError, match=name):
        gpu_tuning.record("GPU", {name: value}, "bench", path)
    # written by hand (or by another version): that entry is skipped, the rest kept
    entry = {"choices": {name: value, "WARPS": 2}}
    path.write_text(json.dumps({"GPU": entry}, default=list))
    assert gpu_tuning.load("GPU", path) == {"WARPS": 2}


def test_an_unreadable_file_means_the_built_in_shapes(tmp_path):
    path = tmp_path / "gpu_kernels.json"
    path.write_text("{not json")
    assert gpu_tuning.load("GPU", path) == {}
    gpu_tuning.record("GPU", {"WARPS": 2}, "bench", path)  # replaced
    assert gpu_tuning.load("GPU", path) == {"WARPS": 2}
    path.write_text("[1, 2]")
    assert gpu_tuning.load("GPU", path) == {}


def test_the_runtime_takes_them_when_it_first_uses_the_gpu(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHDESK_CACHE_DIR", str(tmp_path))
    gpu_tuning.record("Test GPU", {"DECODE_MOE": "by pick", "LINEAR_ROWS": (32, 4)}, "bench")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda dev=None: "Test GPU")
    for name in ("DECODE_MOE", "LINEAR_ROWS"):  # restored after the test
        monkeypatch.setattr(gpu_kernels, name, getattr(gpu_kernels, name))
    monkeypatch.setattr(gpu_kernels, "TUNED", {})
    monkeypatch.setenv("FLASHDESK_GPU_TUNING", "0")
    gpu_kernels._apply_tuning(torch.device("cuda"))
    assert gpu_kernels.DECODE_MOE == "rows" and not gpu_kernels.TUNED
    monkeypatch.setenv("FLASHDESK_GPU_TUNING", "1")
    gpu_kernels._apply_tuning(torch.device("cuda"))
    assert gpu_kernels.DECODE_MOE == "by pick" and gpu_kernels.LINEAR_ROWS == (32, 4)
    assert gpu_kernels.TUNED == {"cuda": {"DECODE_MOE": "by pick", "LINEAR_ROWS": (32, 4)}}


def test_every_tunable_name_is_a_gpu_kernels_setting_of_that_shape():
    for name in gpu_tuning.TUNABLE:
        assert gpu_tuning.valid(name, getattr(gpu_kernels, name)), name


def test_a_linear_takes_its_shapes_own_recorded_options(monkeypatch):
    """`LINEAR_ROWS_BY_SHAPE` (what `bench gpu-kernels` found fastest for each V4 linear) sets
    the rows kernel's options for weights of that shape and byte width; other shapes, and calls
    naming their options, keep the global ones; the values are the same either way."""
    from _triton import kernels_device

    dev = kernels_device()
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 256, generator=g).to(torch.bfloat16).to(dev)
    x = torch.randn(1, 256, generator=g).to(dev)
    grids = []
    kernel = gpu_kernels._linear_kernel

    class Spy:
        def __getitem__(self, grid):
            grids.append(grid)
            return kernel[grid]

    monkeypatch.setattr(gpu_kernels, "_linear_kernel", Spy())
    monkeypatch.setattr(gpu_kernels, "LINEAR_ROWS", (16, 4))
    want = gpu_kernels.linear(x, weight, out_dtype=torch.float32)
    monkeypatch.setattr(gpu_kernels, "LINEAR_ROWS_BY_SHAPE", {(64, 256, 1, 2): (4, 2, 64, 0)})
    got = gpu_kernels.linear(x, weight, out_dtype=torch.float32)
    other = gpu_kernels.linear(x, weight[:32], out_dtype=torch.float32)  # another shape
    named = gpu_kernels.linear(x, weight, out_dtype=torch.float32, block_n=16)
    assert grids == [(1, 4, 1), (1, 16, 1), (1, 2, 1), (1, 4, 1)]  # 64 rows / rows per program
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(other, want[:, :32], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(named, want, rtol=1e-5, atol=1e-5)
