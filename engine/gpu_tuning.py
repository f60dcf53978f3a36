"""Kernel shapes measured on the user's GPU, kept per GPU model in the user cache.

Why: the fastest tile shapes and kernel kinds differ between GPUs (memory bandwidth, SM count,
register file); `engine.gpu_kernels` holds the lent H200's. `flashdesk bench gpu-kernels`
sweeps them on this machine and records the fastest here; the runtime applies them when it
first uses that GPU (`gpu_kernels.available`). A file that cannot be read, or an entry that does
not fit, is ignored: the defaults still compute the same values, only slower.
"""

from __future__ import annotations

import json
from pathlib import Path

from flashdesk.offload.bandwidth import cache_dir

# name in gpu_kernels → (type of each item, length; 0 for a scalar)
TUNABLE: dict[str, tuple[type, int]] = {
    "TILES": (int, 4),
    "WARPS": (int, 0),
    "FP4_MODE": (int, 3),
    "FP4_STAGES": (int, 0),
    "DECODE_MOE": (str, 0),
    "BY_PICK_TILES": (int, 3),
    "BY_PICK_WARPS": (int, 0),
    "GROUPED_TILES": (int, 3),
    "GROUPED_WARPS": (int, 0),
    "LINEAR_KIND": (str, 0),
    "LINEAR_ROWS": (int, 2),
    "LINEAR_ROWS_K": (int, 0),
    "LINEAR_ROWS_MIN_PROGRAMS": (int, 0),
    "LINEAR_ROWS_UNROLL": (int, 0),
    "LINEAR_ROWS_STAGES": (int, 0),
    "LINEAR_TILES": (int, 3),
    "LINEAR_STAGES": (int, 0),
    "LINEAR_MIN_PROGRAMS": (int, 0),
    "DECODE_ROWS_PER_SPLIT": (int, 0),
    "DECODE_ATTENTION": (str, 0),
    "DECODE_HEAD_ROWS_PER_SPLIT": (int, 0),
    # {(N, K, groups, bytes per weight): (rows, warps, columns per step, programs wanted)}; in
    # JSON keyed "NxKxGxB"
    "LINEAR_ROWS_BY_SHAPE": (dict, 0),
}
CHOICES = {
    "DECODE_MOE": ("rows", "by pick"),
    "LINEAR_KIND": ("rows", "dot"),
    "DECODE_ATTENTION": ("head", "heads"),
}


def default_path() -> Path:
    return cache_dir() / "gpu_kernels.json"


def valid(name: str, value) -> bool:
    """Whether `value` can stand for gpu_kernels' `name` (the right kind, length, range)."""
    if name not in TUNABLE:
        return False
    kind, length = TUNABLE[name]
    if kind is dict:
        return isinstance(value, dict) and all(
            _shape_key(key) is not None and _rows_choice(choice) for key, choice in value.items()
        )
    if name == "LINEAR_STAGES" and value is None:
        return True
    items = value if length else [value]
    if not isinstance(items, (list, tuple)) or len(items) != max(length, 1):
        return False
    if kind is str:
        return value in CHOICES[name]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
        return False
    if name == "FP4_MODE":  # (MODE 0-2 or 4, F16, SPLIT)
        return items[0] in (0, 1, 2, 4) and all(v in (0, 1) for v in items[1:])
    if name in ("LINEAR_MIN_PROGRAMS", "LINEAR_ROWS_MIN_PROGRAMS"):
        return 0 <= value <= 1 << 20
    if name in ("LINEAR_STAGES", "FP4_STAGES", "LINEAR_ROWS_STAGES"):
        return 1 <= value <= 8
    if name == "DECODE_HEAD_ROWS_PER_SPLIT" and value == 0:
        return True  # by the layer's rows
    # tiles and warps: powers of two the kernels take (tensor-core tiles: at least 16 a side)
    # (rows per split of the decode attention: whole 16-row blocks)
    low = 16 if name in ("GROUPED_TILES", "BY_PICK_TILES", "LINEAR_TILES") else 1
    low = 16 if name in ("DECODE_ROWS_PER_SPLIT", "DECODE_HEAD_ROWS_PER_SPLIT") else low
    return all(low <= v <= 4096 and v & (v - 1) == 0 for v in items)


def _shape_key(key) -> tuple[int, int, int, int] | None:
    """(N, K, groups, bytes per weight) from a tuple or its JSON form "NxKxGxB"; None where it
    is neither."""
    if isinstance(key, str):
        try:
            key = tuple(int(v) for v in key.split("x"))
        except ValueError:
            return None
    ok = isinstance(key, tuple) and len(key) == 4
    return key if ok and all(isinstance(v, int) and v > 0 for v in key) else None


def shape_name(shape) -> str:
    """A weight shape (N, K, groups, bytes per weight) as its JSON key "NxKxGxB"."""
    return "x".join(str(v) for v in shape)


def _rows_choice(choice) -> bool:
    """(rows, warps, columns per step, programs wanted): powers of two, then 0..2^20."""
    if not isinstance(choice, (list, tuple)) or len(choice) != 4:
        return False
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in choice):
        return False
    *sizes, wanted = choice
    return all(1 <= v <= 4096 and v & (v - 1) == 0 for v in sizes) and 0 <= wanted <= 1 << 20


def _from_json(name: str, value):
    if TUNABLE[name][0] is dict:
        return {_shape_key(k): tuple(v) for k, v in value.items()}
    return tuple(value) if isinstance(value, list) else value


def _to_json(value):
    if isinstance(value, dict):
        return {shape_name(_shape_key(k)): list(c) for k, c in value.items()}
    return list(value) if isinstance(value, tuple) else value


def load(gpu: str, path: str | Path | None = None) -> dict:
    """The recorded shapes for GPU model `gpu` that fit (tuples where gpu_kernels has tuples);
    {} when there are none or the file is unreadable."""
    try:
        data = json.loads(Path(path or default_path()).read_text(encoding="utf-8"))
        entry = data.get(gpu, {}).get("choices", {})
    except (OSError, ValueError, AttributeError):
        return {}
    if not isinstance(entry, dict):
        return {}
    return {name: _from_json(name, value) for name, value in entry.items() if valid(name, value)}


def record(gpu: str, choices: dict, note: str, path: str | Path | None = None) -> Path:
    """Store `choices` (gpu_kernels names → values) for GPU model `gpu`, keeping other GPUs'
    entries; an unreadable file is replaced. Returns the file written."""
    for name, value in choices.items():
        if not valid(name, value):
            raise ValueError(f"{name} = {value!r} is not a valid gpu_kernels choice")
    path = Path(path or default_path())
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            data = {}
    except (OSError, ValueError):
        data = {}
    data[gpu] = {"choices": {k: _to_json(v) for k, v in choices.items()}}
    data[gpu]["note"] = note
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path
