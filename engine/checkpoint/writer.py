"""Write checkpoints in the exact official layout (spec §4): for tests, benchmarks and the oracle.

Names, dtypes, shapes and the shard split come from the inventory; FP8 weights get E8M0 tile
scales, FP4 experts are packed two per byte with per-32 E8M0 scales. Shards are written one at a
time and tensor by tensor (large BF16 tensors in row chunks), so memory stays at about one tensor
whatever the checkpoint size; each shard appears under its final name only when complete.
"""

from __future__ import annotations

import json
import math
import shutil
import zlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np
import torch

from flashdesk.engine import quant
from flashdesk.engine.checkpoint.reader import INDEX_NAME
from flashdesk.engine.checkpoint.safetensors_file import (
    CheckpointError,
    header_bytes,
    storage_order,
)
from flashdesk.engine.config import ModelConfig
from flashdesk.engine.inventory import TensorSpec, inventory

GENERATION_CONFIG = {
    "_from_model_config": True,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "do_sample": True,
    "temperature": 1.0,
    "top_p": 1.0,
    "transformers_version": "4.46.3",
}
_STORE_DTYPES = {
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "I64": torch.int64,
    "F16": torch.float16,
}
_CHUNK_ELEMENTS = 1 << 24  # rows per chunk of a large tensor: ~16M elements


def is_quantized_part(spec: TensorSpec) -> bool:
    """A weight stored with a companion E8M0 scale, or that scale."""
    return spec.scale_name is not None or (spec.dtype == "F8_E8M0" and spec.name.endswith(".scale"))


def _base(name: str) -> str:
    return name.rsplit(".", 1)[0]


class _PairSource:
    """Quantized weights come as (codes, scales) pairs; the writer asks for the two halves
    separately, so the other half waits here until it is written (one pair at a time)."""

    def __init__(self, config: ModelConfig) -> None:
        self.config = config
        self.specs = inventory(config).by_name
        self._pending: dict[str, dict[str, torch.Tensor]] = {}

    def make_pair(self, base: str) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def plain(self, spec: TensorSpec) -> Iterator[torch.Tensor]:
        raise NotImplementedError

    def chunks(self, spec: TensorSpec) -> Iterator[torch.Tensor]:
        if not is_quantized_part(spec):
            yield from self.plain(spec)
            return
        base = _base(spec.name)
        part = spec.name.rsplit(".", 1)[1]
        if base not in self._pending:
            codes, scales = self.make_pair(base)
            self._pending[base] = {"weight": codes, "scale": scales}
        value = self._pending[base].pop(part)
        if not self._pending[base]:
            del self._pending[base]
        yield value


def _check_shape(name: str, t: torch.Tensor, shape: tuple[int, ...], what: str = "") -> None:
    if tuple(t.shape) != tuple(shape):
        raise CheckpointError(
            f"{name}{what} has shape {list(t.shape)}, but the config needs {list(shape)}."
        )


def _scale_bytes(name: str, s: torch.Tensor) -> torch.Tensor:
    """E8M0 scales given as bytes, float8_e8m0fnu, or float powers of two -> uint8."""
    if s.dtype in (torch.uint8, torch.float8_e8m0fnu):
        return s.contiguous().view(torch.uint8)
    f = s.to(torch.float64)
    exp = torch.log2(f)
    if not (torch.isfinite(exp).all() and torch.equal(exp, exp.round())):
        raise CheckpointError(f"{name} must hold powers of two (E8M0 scales); it has other values.")
    return (exp.round() + 127).clamp(0, 254).to(torch.uint8)


class _DictSource(_PairSource):
    """{official_name: tensor}: float weights get quantized; raw codes + scales are kept as given."""

    RAW = (torch.float8_e4m3fn, torch.uint8, torch.int8, torch.float4_e2m1fn_x2)

    def __init__(self, config: ModelConfig, tensors: Mapping[str, torch.Tensor]) -> None:
        super().__init__(config)
        self.tensors = tensors
        expected = set(self.specs)
        given = set(tensors)
        raw_weights = {
            n
            for n in given
            if n in expected and self.specs[n].scale_name and tensors[n].dtype in self.RAW
        }
        needed = {
            n for n in expected if not (n.endswith(".scale") and self.specs[n].dtype == "F8_E8M0")
        }
        needed |= {self.specs[n].scale_name for n in raw_weights}
        missing = sorted(needed - given)
        unknown = sorted(given - expected)
        extra_scales = sorted(
            n
            for n in given & expected
            if n.endswith(".scale") and self.specs[n].dtype == "F8_E8M0" and n not in needed
        )
        problems = []
        if missing:
            problems.append(f"{len(missing)} tensor(s) missing: {', '.join(missing[:10])}")
        if unknown:
            problems.append(
                f"{len(unknown)} name(s) the config does not have: {', '.join(unknown[:10])}"
            )
        if extra_scales:
            problems.append(
                f"scales given for float weights (which the writer quantizes itself): {', '.join(extra_scales[:10])}"
            )
        if problems:
            raise CheckpointError(
                "Cannot write the checkpoint: " + "; ".join(problems) + ". Pass one tensor per "
                "official name (Inventory.from_config(config).by_name), float weights unquantized, "
                "or raw codes together with their .scale."
            )

    def make_pair(self, base: str) -> tuple[torch.Tensor, torch.Tensor]:
        wspec, sspec = self.specs[base + ".weight"], self.specs[base + ".scale"]
        w = self.tensors[wspec.name]
        if w.dtype in self.RAW:
            codes = w.contiguous().view(torch.uint8)
            _check_shape(wspec.name, codes, wspec.shape)
            scales = _scale_bytes(sspec.name, self.tensors[sspec.name])
            _check_shape(sspec.name, scales, sspec.shape)
            return codes, scales
        if wspec.dtype == "I8":
            _check_shape(wspec.name, w, (wspec.shape[0], 2 * wspec.shape[1]))
            return quant.quantize_fp4(w)
        _check_shape(wspec.name, w, wspec.shape)
        return quant.quantize_fp8(w, self.config.fp8_block)

    def plain(self, spec: TensorSpec) -> Iterator[torch.Tensor]:
        t = self.tensors[spec.name]
        _check_shape(spec.name, t, spec.shape)
        if spec.dtype == "I64" and t.is_floating_point():
            raise CheckpointError(f"{spec.name} must hold integers (expert ids).")
        yield t.to(_STORE_DTYPES[spec.dtype])


def _quantile_codes(n: int, sigma: float, encode) -> torch.Tensor:
    """n equiprobable quantiles of N(0, sigma²), encoded: a uniform index then draws a code
    distributed like a quantized Gaussian (realistic: many small values, few large)."""
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    return encode(torch.special.ndtri(u).to(torch.float32) * sigma)


# byte -> E4M3 code; the top quantile (2.66σ) lands near 448, the largest code.
_FP8_SIGMA = 160.0
_FP8_LUT = _quantile_codes(256, _FP8_SIGMA, quant.float_to_e4m3).numpy()
# byte -> packed pair of E2M1 codes, each from 16 quantiles of N(0, 2.5²) (largest: ±4).
_FP4_SIGMA = 2.5
_E2M1_16 = _quantile_codes(16, _FP4_SIGMA, quant.float_to_e2m1)
_FP4_LUT = (_E2M1_16[torch.arange(256) & 15] | (_E2M1_16[torch.arange(256) >> 4] << 4)).numpy()


class RandomWeights(_PairSource):
    """Deterministic random weights per tensor name and seed, scaled so a forward pass stays
    numerically sane through every layer: linears have std ≈ 1/sqrt(fan_in) (FP8 tiles and FP4
    groups get varied power-of-two scales, so scale indexing is exercised), norms ≈ 1, mHC mixing
    small. Quantized weights are drawn as codes directly (no float matrix, no amax pass), which
    keeps writing a real-size layer fast."""

    def __init__(self, config: ModelConfig, seed: int = 0) -> None:
        super().__init__(config)
        self.seed = seed

    def _key(self, name: str) -> int:
        return (self.seed * 0x9E3779B1 + zlib.crc32(name.encode())) & (2**62 - 1)

    def generator(self, name: str) -> torch.Generator:
        return torch.Generator().manual_seed(self._key(name))

    def make_pair(self, base: str) -> tuple[torch.Tensor, torch.Tensor]:
        spec = self.specs[base + ".weight"]
        rng = np.random.Generator(np.random.PCG64(self._key(base)))
        out_f, cols = spec.shape
        in_f = 2 * cols if spec.dtype == "I8" else cols
        codes = torch.from_numpy(
            (_FP4_LUT if spec.dtype == "I8" else _FP8_LUT)[
                rng.integers(0, 256, size=(out_f, cols), dtype=np.uint8)
            ]
        )
        sigma = _FP4_SIGMA if spec.dtype == "I8" else _FP8_SIGMA
        e0 = round(math.log2(1.0 / (sigma * math.sqrt(in_f))))
        scale_shape = self.specs[base + ".scale"].shape
        jitter = torch.from_numpy(rng.integers(-1, 2, size=scale_shape, dtype=np.int16))
        return codes, (jitter + e0 + 127).to(torch.uint8)

    def plain(self, spec: TensorSpec) -> Iterator[torch.Tensor]:
        g = self.generator(spec.name)
        name, shape = spec.name, spec.shape
        if spec.dtype == "I64":  # tid2eid: distinct experts per token id
            n_exp = self.config.n_routed_experts
            rows = max(1, _CHUNK_ELEMENTS // (n_exp * 8))
            for r0 in range(0, shape[0], rows):
                n = min(rows, shape[0] - r0)
                yield torch.multinomial(torch.ones(n, n_exp), shape[1], generator=g)
            return
        cols = shape[-1] if len(shape) > 1 else 1
        rows_total = shape[0] if len(shape) > 1 else 1
        rows = max(1, _CHUNK_ELEMENTS // cols)
        for r0 in range(0, rows_total, rows):
            n = min(rows, rows_total - r0)
            sub = (n, *shape[1:]) if len(shape) > 1 else shape
            x = torch.randn(sub, generator=g)
            yield self._shape_values(name, x, cols).to(_STORE_DTYPES[spec.dtype])

    @staticmethod
    def _shape_values(name: str, x: torch.Tensor, cols: int) -> torch.Tensor:
        leaf = name.rsplit(".", 1)[-1] if not name.endswith(".weight") else name
        if name.endswith("norm.weight"):
            return 1.0 + 0.1 * x
        if name == "embed.weight":
            return x
        if name.endswith(".weight"):
            return x / math.sqrt(cols)
        if leaf.endswith("_fn"):
            return x / math.sqrt(cols)
        if leaf.endswith("_scale"):
            return 0.5 + 0.25 * x.abs()
        if leaf.endswith("_base") or leaf == "attn_sink":
            return 0.5 * x
        return 0.1 * x  # ape, gate.bias

    def tensor(self, name: str) -> torch.Tensor:
        """The float32 value the writer stores for `name` (dequantized), for tests."""
        spec = self.specs[name]
        if is_quantized_part(spec):
            codes, scales = self.make_pair(_base(name))
            if name.endswith(".scale"):
                return quant.e8m0_to_float(scales)
            if spec.dtype == "I8":
                return quant.dequant_fp4(codes, scales)
            return quant.dequant_fp8(codes, scales, self.config.fp8_block)
        parts = list(self.plain(spec))
        t = torch.cat(parts) if len(spec.shape) > 1 or len(parts) > 1 else parts[0]
        return t if spec.dtype == "I64" else t.to(torch.float32)


def _to_bytes(chunk: torch.Tensor):
    flat = chunk.contiguous().view(-1)
    if flat.dtype != torch.uint8:
        flat = flat.view(torch.uint8)
    return flat.numpy()


def _prepare(path: Path, overwrite: bool) -> None:
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{path} exists and is not a folder; choose another output folder.")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise CheckpointError(
                f"{path} is not empty. Choose an empty folder, or allow overwriting it."
            )
        for child in path.iterdir():
            if child.is_dir():
                shutil.rmtree(child)
            else:
                child.unlink()
    path.mkdir(parents=True, exist_ok=True)


def _write(
    path: Path,
    config: ModelConfig,
    source: _PairSource,
    overwrite: bool,
    progress: Callable[[str, int, int], None] | None = None,
) -> Path:
    path = Path(path)
    _prepare(path, overwrite)
    (path / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2) + "\n")
    (path / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2) + "\n")
    inv = inventory(config)
    by_shard: dict[str, list[TensorSpec]] = {}
    for spec in inv.tensors:
        by_shard.setdefault(spec.shard, []).append(spec)
    weight_map: dict[str, str] = {}
    for i, (shard, specs) in enumerate(sorted(by_shard.items())):
        order = storage_order(specs)  # as the safetensors library orders them
        header, _ = header_bytes([(s.name, s.dtype, s.shape) for s in order])
        partial = path / (shard + ".partial")
        with open(partial, "wb") as f:
            f.write(header)
            for spec in order:
                written = 0
                for chunk in source.chunks(spec):
                    data = _to_bytes(chunk)
                    f.write(data)
                    written += data.nbytes
                if written != spec.nbytes:
                    raise CheckpointError(
                        f"{spec.name}: {written} bytes produced, {spec.nbytes} expected "
                        f"({spec.dtype} {list(spec.shape)})."
                    )
                weight_map[spec.name] = shard
        partial.replace(path / shard)
        if progress is not None:
            progress(shard, i + 1, len(by_shard))
    index = {
        "metadata": {"total_size": inv.total_bytes},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (path / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return path


def write_checkpoint(
    path: str | Path,
    config: ModelConfig,
    tensors: Mapping[str, torch.Tensor],
    *,
    overwrite: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
) -> Path:
    """Write `tensors` ({official name: tensor}) as an official-layout checkpoint in `path`.

    Float tensors for FP8/FP4 weights are quantized here (reference scales, round-to-nearest-even);
    already-quantized weights (float8_e4m3fn / uint8 codes, packed int8/uint8 FP4) are stored as
    given with their `.scale` (uint8, float8_e8m0fnu or float powers of two). Everything else is
    cast to its official dtype. Every name the config needs must be present, and no other.
    """
    return _write(Path(path), config, _DictSource(config, tensors), overwrite, progress)


def write_random(
    path: str | Path,
    config: ModelConfig,
    seed: int = 0,
    *,
    overwrite: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
) -> Path:
    """Write deterministic random weights (see RandomWeights) for `config` in the official layout."""
    return _write(Path(path), config, RandomWeights(config, seed), overwrite, progress)
