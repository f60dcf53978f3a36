"""Checkpoint: the official sharded safetensors release, read in place and lazily.

Opening reads the index and each shard's header only; `raw()` hands out zero-copy views of the
memory-mapped file, `tensor()` dequantizes with the companion `.scale`. Names are always the
official ones (spec §4.2); a checkpoint saved by transformers is translated through `names.py`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from flashdesk.engine import quant
from flashdesk.engine.checkpoint import names as hf_names
from flashdesk.engine.checkpoint.safetensors_file import (
    GGUF_MAGIC,
    CheckpointError,
    MappedShard,
    ShardHeader,
    read_header,
)
from flashdesk.engine.config import ConfigError, ModelConfig
from flashdesk.engine.inventory import Inventory, TensorSpec, inventory

INDEX_NAME = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
TORCH_DTYPES = {
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E8M0": torch.float8_e8m0fnu,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "I64": torch.int64,
}
FLOAT_DTYPES = ("BF16", "F16", "F32")
_MAX_LISTED = 20


@dataclass(frozen=True)
class TensorInfo:
    """Where an official tensor lives: stored dtype/shape and the absolute byte range in its shard."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    shard: Path
    begin: int
    end: int
    stored_name: str  # differs from `name` in transformers-saved checkpoints

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass
class VerifyReport:
    """Problems make the checkpoint unusable; notes are informational."""

    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    tensors_checked: int = 0
    shards_checked: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def __str__(self) -> str:
        head = (
            f"checkpoint OK: {self.tensors_checked} tensors in {self.shards_checked} shards"
            if self.ok
            else f"{len(self.problems)} problem(s) found:"
        )
        lines = [head] + [f"  - {p}" for p in self.problems] + [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f" and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else "")


class Checkpoint:
    """A V4 checkpoint folder (index + shards) or a single `.safetensors` file."""

    def __init__(self, path: Path, config: ModelConfig | None) -> None:
        self.path = path
        self.config = config
        self.naming = "official"
        self.structural_problems: list[str] = []
        self.notes: list[str] = []
        self.index_total_size: int | None = None
        self._infos: dict[str, TensorInfo] = {}
        self._unknown: dict[str, TensorInfo] = {}
        self._shards: dict[Path, MappedShard] = {}
        self._missing_shards: dict[str, list[str]] = {}

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(
        cls, path: str | Path, config: ModelConfig | None = None, strict: bool = True
    ) -> Checkpoint:
        """Read the index and shard headers (no tensor data). With `strict`, a missing, truncated
        or corrupt shard raises CheckpointError; otherwise `verify()` lists it."""
        path = Path(path).expanduser()
        if not path.exists():
            raise CheckpointError(
                f"{path} does not exist. Choose the folder you downloaded DeepSeek-V4-Flash into."
            )
        folder = path if path.is_dir() else path.parent
        if path.is_file():
            _refuse_other_formats([path])
            if path.suffix != ".safetensors":
                raise CheckpointError(
                    f"{path} is not a .safetensors file. Choose the checkpoint folder (with "
                    f"{INDEX_NAME}) or one .safetensors file."
                )
        if config is None:
            config = _read_config(folder)
        ckpt = cls(path, config)
        if path.is_dir():
            shard_files, weight_map = ckpt._read_index(path)
        else:
            shard_files, weight_map = [path], None
        ckpt._read_shards(shard_files, weight_map)
        if strict and ckpt.structural_problems:
            raise CheckpointError(
                f"The checkpoint in {path} cannot be used:\n  - "
                + "\n  - ".join(ckpt.structural_problems)
            )
        return ckpt

    def _read_index(self, folder: Path) -> tuple[list[Path], dict[str, str] | None]:
        index = folder / INDEX_NAME
        if not index.is_file():
            files = sorted(folder.glob("*.safetensors"))
            if not files:
                _refuse_other_formats(sorted(p for p in folder.iterdir() if p.is_file()))
                raise CheckpointError(
                    f"{folder} holds no .safetensors files. Download DeepSeek-V4-Flash (its 46 "
                    f"model-000NN-of-00046.safetensors shards and {INDEX_NAME}) into it."
                )
            if len(files) > 1:
                self.notes.append(f"no {INDEX_NAME}; reading all {len(files)} .safetensors files")
            return files, None
        try:
            data = json.loads(index.read_text(encoding="utf-8"))
            weight_map = data["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(
                f"{index} is damaged ({exc}). Download {INDEX_NAME} again."
            ) from None
        total = (data.get("metadata") or {}).get("total_size")
        self.index_total_size = int(total) if total is not None else None
        by_shard: dict[str, list[str]] = {}
        for name, shard in weight_map.items():
            by_shard.setdefault(shard, []).append(name)
        files = []
        for shard in sorted(by_shard):
            p = folder / shard
            if p.is_file():
                files.append(p)
            else:
                self._missing_shards[shard] = by_shard[shard]
                self.structural_problems.append(
                    f"shard {shard} is missing (it should hold {len(by_shard[shard])} tensors, "
                    f"e.g. {by_shard[shard][0]}). Download it into {folder}."
                )
        return files, weight_map

    def _read_shards(self, files: list[Path], weight_map: dict[str, str] | None) -> None:
        stored_total = 0
        for p in files:
            try:
                header = read_header(p)
            except CheckpointError as exc:
                self.structural_problems.append(str(exc))
                continue
            if header.file_size < header.expected_size:
                self.structural_problems.append(
                    f"{p.name} is truncated: its header says the data runs to byte "
                    f"{header.expected_size} but the file has {header.file_size} bytes. Download "
                    f"{p.name} again (the download did not finish)."
                )
                continue
            if header.file_size > header.expected_size:
                self.notes.append(
                    f"{p.name} has {header.file_size - header.expected_size} bytes after its last tensor"
                )
            self._shards[p] = MappedShard(header)
            stored_total += sum(e.nbytes for e in header.entries.values())
            self._add_entries(header, weight_map)
        if weight_map is not None:
            present = {info.stored_name for info in self._infos.values()} | {
                info.stored_name for info in self._unknown.values()
            }
            loaded = {s.header.path.name for s in self._shards.values()}
            lost = [n for n, s in weight_map.items() if s in loaded and n not in present]
            lost = [n for n in lost if not _is_merged_source(n, present)]
            if lost:
                self.structural_problems.append(
                    f"{len(lost)} tensor(s) listed in {INDEX_NAME} are not in the shard the index "
                    f"names: {_listing(sorted(lost))}. Download the checkpoint again."
                )
        if (
            self.index_total_size is not None
            and not self._missing_shards
            and len(self._shards) == len(files)
            and stored_total != self.index_total_size
        ):
            self.structural_problems.append(
                f"{INDEX_NAME} says the tensors total {self.index_total_size} bytes but the shards "
                f"hold {stored_total}. The files do not belong together; download them again."
            )

    def _add_entries(self, header: ShardHeader, weight_map: dict[str, str] | None) -> None:
        for stored, e in header.entries.items():
            if weight_map is not None and weight_map.get(stored) not in (None, header.path.name):
                self.structural_problems.append(
                    f"{stored} is in {header.path.name} but {INDEX_NAME} says "
                    f"{weight_map[stored]}. Download the checkpoint again."
                )
            if hf_names.is_hf_name(stored):
                self.naming = "hf"
                merged = hf_names.merged_experts(stored)
                if merged is not None:
                    self._add_merged(stored, e, header.path, *merged)
                    continue
                official = hf_names.hf_to_official(stored)
            else:
                official = stored
            info = TensorInfo(
                official or stored, e.dtype, e.shape, header.path, e.begin, e.end, stored
            )
            if official is None:
                self._unknown[stored] = info
            elif official in self._infos:
                self.structural_problems.append(
                    f"tensor {official} is stored twice ({self._infos[official].shard.name} and "
                    f"{header.path.name}). Download the checkpoint again."
                )
            else:
                self._infos[official] = info

    def _add_merged(self, stored, e, shard: Path, layer: int, kind: str) -> None:
        """Split transformers' merged expert tensors into per-expert official tensors (views)."""
        if len(e.shape) != 3:
            self._unknown[stored] = TensorInfo(
                stored, e.dtype, e.shape, shard, e.begin, e.end, stored
            )
            return
        n_exp, rows, cols = e.shape
        item = (e.end - e.begin) // max(n_exp * rows * cols, 1)
        per_expert = rows * cols * item
        parts = (
            [("w1", 0, rows // 2), ("w3", rows // 2, rows)]
            if kind == "gate_up"
            else [("w2", 0, rows)]
        )
        for x in range(n_exp):
            for w, r0, r1 in parts:
                begin = e.begin + x * per_expert + r0 * cols * item
                name = f"layers.{layer}.ffn.experts.{x}.{w}.weight"
                self._infos[name] = TensorInfo(
                    name,
                    e.dtype,
                    (r1 - r0, cols),
                    shard,
                    begin,
                    begin + (r1 - r0) * cols * item,
                    stored,
                )

    # ------------------------------------------------------------------ access

    def names(self) -> list[str]:
        """Official names of every stored tensor, in file order."""
        return list(self._infos)

    def __contains__(self, name: str) -> bool:
        return name in self._infos

    @property
    def has_mtp(self) -> bool:
        """Whether the checkpoint holds the MTP block (`mtp.0.*`), which speculative decoding
        drafts with."""
        return any(n.startswith("mtp.") for n in self.names())

    def __len__(self) -> int:
        return len(self._infos)

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            for shard, names in self._missing_shards.items():
                if name in names:
                    raise CheckpointError(
                        f"{name} is in shard {shard}, which is missing. Download it into "
                        f"{self.path}."
                    ) from None
            raise CheckpointError(
                f"This checkpoint has no tensor {name!r}. Names are official ones such as "
                "'layers.0.attn.wq_a.weight' (see Checkpoint.names())."
            ) from None

    def raw(self, name: str) -> torch.Tensor:
        """The tensor as stored (float8_e4m3fn / int8 / float8_e8m0fnu / bf16 / f32 / i64), a
        zero-copy view of the mapped file (private: writing to it never touches the file)."""
        info = self.info(name)
        shard = self._shards[info.shard]
        dtype = TORCH_DTYPES[info.dtype]
        count = (info.end - info.begin) // dtype.itemsize
        if count == 0:
            return torch.empty(info.shape, dtype=dtype)
        flat = torch.frombuffer(shard.buffer(), dtype=dtype, count=count, offset=info.begin)
        return flat.view(info.shape)

    def scale_of(self, name: str) -> str | None:
        """Name of the companion scale of a quantized weight, if the checkpoint has one."""
        if not name.endswith(".weight"):
            return None
        scale = name[: -len(".weight")] + ".scale"
        return scale if scale in self._infos else None

    def tensor(
        self, name: str, dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The tensor's values: FP8 / FP4 weights dequantized with their E8M0 scales, E8M0 scales
        as powers of two, floats cast to `dtype`; integer tables (tid2eid) as stored (int64).
        `out` (float32, the weight's shape) receives a dequantized FP8/FP4 weight in place."""
        info = self.info(name)
        raw = self.raw(name)
        if info.dtype in ("F8_E4M3", "I8") and name.endswith(".weight"):
            scale_name = self.scale_of(name)
            if scale_name is None:
                raise CheckpointError(
                    f"{name} is stored quantized ({info.dtype}) but its scale "
                    f"{name[:-7]}.scale is missing. The checkpoint is incomplete; download it again."
                )
            scale = self.raw(scale_name)
            try:
                if info.dtype == "F8_E4M3":
                    return quant.dequant_fp8(raw, scale, self._fp8_block(), dtype, out)
                return quant.dequant_fp4(raw, scale, quant.FP4_GROUP, dtype, out)
            except ValueError as exc:
                raise CheckpointError(f"{name}: {exc}. The checkpoint is damaged.") from None
        if info.dtype == "F8_E8M0":
            return quant.e8m0_to_float(raw).to(dtype)
        if info.dtype == "F8_E4M3":
            return quant.e4m3_to_float(raw).to(dtype)
        if info.dtype in FLOAT_DTYPES:
            return raw.to(dtype)
        return raw

    def expert(
        self,
        layer: int,
        expert: int,
        dtype: torch.dtype = torch.float32,
        out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(w1, w3, w2) of one routed expert, dequantized: [I, D], [I, D], [D, I]; `out` reuses
        three float32 buffers of those shapes."""
        prefix = self.config.layer(layer).prefix if self.config else f"layers.{layer}."
        p = f"{prefix}ffn.experts.{expert}."
        bufs = out if out is not None else (None, None, None)
        w1, w3, w2 = (
            self.tensor(p + w + ".weight", dtype, buf)
            for w, buf in zip(("w1", "w3", "w2"), bufs, strict=True)
        )
        return w1, w3, w2

    def _fp8_block(self) -> tuple[int, int]:
        return self.config.fp8_block if self.config is not None else quant.FP8_BLOCK

    def _need_config(self, what: str) -> ModelConfig:
        if self.config is None:
            raise CheckpointError(
                f"{what} needs the model's config.json, which is not next to {self.path}. Put the "
                "official config.json into the checkpoint folder."
            )
        return self.config

    # ------------------------------------------------------------------ inventory, verify

    def inventory(self) -> Inventory:
        """The stored tensors as an Inventory (dtype/shape/shard from the files; category from the
        config's inventory; tensors the config does not expect get category "unknown")."""
        config = self._need_config("Checkpoint.inventory()")
        expected = inventory(config).by_name
        specs = []
        for name, info in self._infos.items():
            ref = expected.get(name)
            specs.append(
                TensorSpec(
                    name,
                    info.dtype,
                    info.shape,
                    ref.category if ref else "unknown",
                    ref.component if ref else "unknown",
                    ref.layer if ref else None,
                    ref.expert if ref else None,
                    info.shard.name,
                )
            )
        order = {name: i for i, name in enumerate(expected)}
        specs.sort(key=lambda s: order.get(s.name, len(order)))
        return Inventory(config, specs)

    def verify(self) -> VerifyReport:
        """Every expected tensor present with the expected dtype and shape, every shard present and
        as long as its header implies; each problem listed once, with what to do."""
        report = VerifyReport(problems=list(self.structural_problems), notes=list(self.notes))
        report.shards_checked = len(self._shards)
        if self.config is None:
            report.problems.append(
                f"no config.json next to {self.path}: cannot check which tensors the model needs. "
                "Put the official config.json into the checkpoint folder."
            )
            return report
        expected = inventory(self.config).by_name
        hf = self.naming == "hf"
        missing_shard_names = {n for names in self._missing_shards.values() for n in names}
        missing, wrong = [], []
        dequantized = recast = 0
        for name, spec in expected.items():
            info = self._infos.get(name)
            if info is None:
                if name in missing_shard_names:
                    continue  # already reported with its shard
                if hf and (
                    name.startswith("mtp.") or (name.endswith(".scale") and self._is_float(name))
                ):
                    continue
                missing.append(name)
                continue
            report.tensors_checked += 1
            if info.dtype == spec.dtype and info.shape == spec.shape:
                continue
            if (
                hf
                and info.dtype in FLOAT_DTYPES
                and spec.scale_name
                and info.shape == _logical(spec)
            ):
                dequantized += 1
                continue
            if hf and {info.dtype, spec.dtype} <= set(FLOAT_DTYPES) and info.shape == spec.shape:
                recast += 1
                continue
            wrong.append(
                f"{name} is {info.dtype} {list(info.shape)}, expected {spec.dtype} {list(spec.shape)}"
            )
        unknown = sorted(set(self._infos) - set(expected)) + sorted(self._unknown)
        if missing:
            report.problems.append(
                f"{len(missing)} tensor(s) missing: {_listing(missing)}. The checkpoint is incomplete "
                "or for a different config; download it again."
            )
        if wrong:
            report.problems.append(
                f"{len(wrong)} tensor(s) with the wrong dtype or shape: {_listing(wrong)}. This is "
                "not the official DeepSeek-V4-Flash layout (or config.json does not match it)."
            )
        if unknown:
            report.problems.append(
                f"{len(unknown)} unexpected tensor(s): {_listing(unknown)}. config.json does not "
                "describe these files; use the config.json that came with them."
            )
        if hf:
            report.notes.append("transformers-style names, read through the name mapping table")
            if dequantized:
                report.notes.append(f"{dequantized} weights are stored dequantized (float)")
            if recast:
                report.notes.append(f"{recast} float tensors are stored in another float dtype")
            if not self.has_mtp and self.config.num_nextn_predict_layers:
                report.notes.append(
                    "no MTP weights (transformers drops them); speculative decoding is off"
                )
        return report

    def _is_float(self, scale_name: str) -> bool:
        weight = self._infos.get(scale_name[: -len(".scale")] + ".weight")
        return weight is not None and weight.dtype in FLOAT_DTYPES

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        for shard in self._shards.values():
            shard.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _logical(spec: TensorSpec) -> tuple[int, ...]:
    """Dequantized shape of a stored weight (FP4 packs two inputs per byte)."""
    if spec.dtype == "I8":
        return (spec.shape[0], spec.shape[1] * 2)
    return spec.shape


def _is_merged_source(name: str, present: set[str]) -> bool:
    return hf_names.merged_experts(name) is not None and name in present


def _read_config(folder: Path) -> ModelConfig | None:
    if not (folder / "config.json").is_file():
        return None
    try:
        return ModelConfig.from_dir(folder)
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None


def _refuse_other_formats(files: list[Path]) -> None:
    """FlashDesk never unpickles weights, and GGUF goes to the GGUF backend."""
    for p in files:
        if p.suffix == ".gguf" or _starts_with(p, GGUF_MAGIC):
            raise CheckpointError(
                f"{p} is a GGUF file. Open it with FlashDesk's GGUF backend (choose the .gguf file "
                "itself); the native engine reads the official safetensors release."
            )
    pickles = [p.name for p in files if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise CheckpointError(
            f"{files[0].parent} holds PyTorch pickle files ({', '.join(pickles[:5])}), not "
            "safetensors. FlashDesk never loads pickles (they can run arbitrary code). Download "
            "the official DeepSeek-V4-Flash release, which ships .safetensors shards."
        )


def _starts_with(path: Path, magic: bytes) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(magic)) == magic
    except OSError:
        return False
