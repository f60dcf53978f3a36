"""One `.safetensors` file: header parsing with precise errors, lazy memory-mapping, streaming write.

Format: 8-byte little-endian header length N, N bytes of JSON
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`, then the data;
offsets are relative to the end of the header. We read the header with plain file reads and map the
data only when a tensor is asked for, so opening a 160 GB checkpoint costs a few MB of RAM.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

from flashdesk.engine.inventory import DTYPE_BYTES

MAX_HEADER_BYTES = 100 * 2**20  # the real shards have ~170 KB headers
GGUF_MAGIC = b"GGUF"


class CheckpointError(Exception):
    """A checkpoint problem a user can cause: the message says what is wrong and what to do."""


@dataclass(frozen=True)
class HeaderEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass
class ShardHeader:
    path: Path
    file_size: int
    data_start: int  # 8 + header length
    entries: dict[str, HeaderEntry]
    metadata: dict

    @property
    def expected_size(self) -> int:
        """The file size the header implies (end of the last tensor)."""
        return max((e.end for e in self.entries.values()), default=self.data_start)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def read_header(path: Path) -> ShardHeader:
    """Parse and check a shard header; raise CheckpointError naming the file and the fix."""
    redownload = f"Download {path.name} again (the file is damaged or incomplete)."
    try:
        file_size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if head[:4] == GGUF_MAGIC:
                raise CheckpointError(
                    f"{path} is a GGUF file, not a safetensors shard. Open it with FlashDesk's GGUF "
                    "backend (choose the .gguf file itself), or point FlashDesk at the folder of "
                    "the official DeepSeek-V4-Flash safetensors release."
                )
            if len(head) < 8:
                raise CheckpointError(
                    f"{path} is only {file_size} bytes, too short for a safetensors header. "
                    + redownload
                )
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or n < 2:
                raise CheckpointError(
                    f"{path} has a corrupt safetensors header (claimed header length {n} bytes). "
                    + redownload
                )
            if 8 + n > file_size:
                raise CheckpointError(
                    f"{path} is truncated: its header alone needs {8 + n} bytes but the file has "
                    f"{file_size}. " + redownload
                )
            raw = f.read(n)
    except OSError as exc:
        raise CheckpointError(f"Cannot read {path}: {exc.strerror or exc}.") from None
    try:
        header = json.loads(raw.decode("utf-8").rstrip(" \x00"))
        if not isinstance(header, dict):
            raise ValueError("not a JSON object")
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(
            f"{path} has a corrupt safetensors header ({exc}). " + redownload
        ) from None
    data_start = 8 + n
    metadata = header.pop("__metadata__", None) or {}
    entries: dict[str, HeaderEntry] = {}
    spans = []
    for name, meta in header.items():
        try:
            dtype = meta["dtype"]
            shape = tuple(int(d) for d in meta["shape"])
            begin, end = (int(x) for x in meta["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(
                f"{path} has a corrupt header entry for {name!r}. " + redownload
            ) from None
        if dtype not in DTYPE_BYTES:
            raise CheckpointError(
                f"{path}: tensor {name!r} has dtype {dtype!r}, which no DeepSeek-V4 checkpoint "
                "uses. This is not the official release; download DeepSeek-V4-Flash again."
            )
        if (
            min(shape, default=0) < 0
            or end - begin != _numel(shape) * DTYPE_BYTES[dtype]
            or begin < 0
        ):
            raise CheckpointError(
                f"{path} has a corrupt header: tensor {name!r} ({dtype} {list(shape)}) has byte "
                f"range [{begin}, {end}), which does not match its size. " + redownload
            )
        entries[name] = HeaderEntry(name, dtype, shape, data_start + begin, data_start + end)
        spans.append((begin, end, name))
    spans.sort()
    for (_, e0, n0), (b1, _, n1) in itertools.pairwise(spans):
        if b1 < e0:
            raise CheckpointError(
                f"{path} has a corrupt header: tensors {n0!r} and {n1!r} overlap. " + redownload
            )
    return ShardHeader(path, file_size, data_start, entries, metadata)


class MappedShard:
    """A shard's bytes, memory-mapped on first use (private copy-on-write: nothing is read until
    touched, and tensors handed out can never write back into the checkpoint)."""

    def __init__(self, header: ShardHeader) -> None:
        self.header = header
        self._map: mmap.mmap | None = None

    def buffer(self) -> mmap.mmap:
        if self._map is None:
            with open(self.header.path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        return self._map

    def close(self) -> None:
        if self._map is not None:
            # Tensors may still view it; then the mapping goes when they do.
            with contextlib.suppress(BufferError):
                self._map.close()
            self._map = None


# The safetensors library's dtype order: tensors are stored by this rank, highest first, then by
# name. With the header below (no `__metadata__`) this reproduces all 46 official shard file sizes
# byte for byte, and every tensor starts at a multiple of its element size.
SAFETENSORS_DTYPE_ORDER = (
    "BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0",
    "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64", "I64", "U64",
)  # fmt: skip


def storage_order(specs: list) -> list:
    """Tensor specs (with .dtype, .name) in the order the safetensors library writes them."""
    return sorted(specs, key=lambda e: (-SAFETENSORS_DTYPE_ORDER.index(e.dtype), e.name))


def shard_file_sizes(specs: list) -> dict[str, int]:
    """File size of every shard (header included) when written in the official order."""
    by_shard: dict[str, list] = {}
    for spec in specs:
        by_shard.setdefault(spec.shard, []).append(spec)
    sizes = {}
    for shard, group in by_shard.items():
        header, _ = header_bytes([(s.name, s.dtype, s.shape) for s in storage_order(group)])
        sizes[shard] = len(header) + sum(s.nbytes for s in group)
    return sizes


def header_bytes(
    entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict | None = None
) -> tuple[bytes, list[int]]:
    """Serialize a header for tensors written in the given order; returns (bytes incl. the 8-byte
    length, data offset of each tensor). Compact JSON padded with spaces to a multiple of 8, like
    safetensors; the official shards carry no `__metadata__`."""
    header: dict = {} if metadata is None else {"__metadata__": metadata}
    offsets = []
    pos = 0
    for name, dtype, shape in entries:
        size = _numel(shape) * DTYPE_BYTES[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + size]}
        offsets.append(pos)
        pos += size
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, offsets
