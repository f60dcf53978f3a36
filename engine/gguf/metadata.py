"""GGUF headers read without loading weights: architecture, hyperparameters, tensor inventory.

A header holds every key/value pair and every tensor's name, type, shape and offset. The `gguf`
library's `GGUFReader` builds a numpy object per vocabulary string (15 s for a 49K vocabulary on
a busy 2-core machine), so the header is walked here with the library's type tables and only the
lengths of long arrays are kept. Split files (`NAME-00001-of-0000N.gguf`) are read part by part.
Everything a user can get wrong (not a GGUF, cut short, missing split parts, an architecture the
bundled llama.cpp cannot run) raises `GGUFError` with what to do.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path

import gguf

from flashdesk.engine.gguf.errors import GGUFError

# Architectures the llama.cpp vendored in llama-cpp-python 0.3.36 loads (src/llama-arch.cpp,
# minus "clip", which names vision/audio projector files).
_ARCHITECTURE_WORDS = """
    llama llama4 deci falcon grok gpt2 gptj gptneox mpt baichuan starcoder refact bert modern-bert
    nomic-bert nomic-bert-moe neo-bert jina-bert-v2 jina-bert-v3 eurobert bloom stablelm qwen qwen2
    qwen2moe qwen2vl qwen3 qwen3moe qwen3next qwen3vl qwen3vlmoe qwen35 qwen35moe qwen4exp phi2 phi3
    phimoe plamo plamo2 plamo3 codeshell orion internlm2 minicpm minicpm3 gemma gemma2 gemma3 gemma3n
    gemma4 gemma4-assistant gemma-embedding starcoder2 mamba mamba2 maple jamba falcon-h1 xverse
    command-r cohere2 cohere2moe dbrx olmo olmo2 olmoe muse-glimmer openelm arctic deepseek deepseek2
    deepseek2-ocr deepseek32 deepseek4 chatglm glm4 glm4moe glm-dsa bitnet t5 t5encoder jais jais2
    nemotron nemotron_h nemotron_h_moe exaone exaone4 exaone-moe rwkv6 rwkv6qwen2 rwkv7 arwkv7 granite
    granitemoe granitehybrid graniteswitch granite_swa chameleon wavtokenizer-dec plm bailingmoe
    bailingmoe2 bailingmoe3 dots1 dots3note arcee afmoe laguna ernie4_5 ernie4_5-moe hunyuan-moe
    hunyuan-dense hunyuan_vl hy_v3 hy_v4 smollm3 gpt-oss lfm2 lfm2moe dream smallthinker llada
    llada-moe seed_oss grovemoe apertus minimax-01 hrm_text minimax-m2 minimax-m3 cogvlm rnd1
    pangu-embedded mistral3 eagle3 dflash mistral4 paddleocr mimo2 step35 spark2_5 llama-embed
    maincoder kimi-linear kimi-k3 glm5-next talkie mellum nanbeige qwen3tts pockettts
"""
LLAMACPP_ARCHITECTURES = frozenset(_ARCHITECTURE_WORDS.split())
V4_ARCHITECTURE = "deepseek4"
# Routed-expert weights in llama.cpp's tensor names (blk.N.ffn_{gate,up,down}_exps.weight, also the
# fused gate_up of some architectures); shared experts (`_shexp`) are not matched.
EXPERT_TENSOR = re.compile(r"^blk\.(\d+)\.ffn_(?:gate|up|down|gate_up)_exps\.")
_SPLIT_NAME = re.compile(r"^(?P<stem>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
_MAX_KEPT_ARRAY = 64  # longer arrays (vocabulary, merges, scores) keep only their length

_SCALAR = {
    gguf.GGUFValueType.UINT8: "<B",
    gguf.GGUFValueType.INT8: "<b",
    gguf.GGUFValueType.UINT16: "<H",
    gguf.GGUFValueType.INT16: "<h",
    gguf.GGUFValueType.UINT32: "<I",
    gguf.GGUFValueType.INT32: "<i",
    gguf.GGUFValueType.FLOAT32: "<f",
    gguf.GGUFValueType.BOOL: "<?",
    gguf.GGUFValueType.UINT64: "<Q",
    gguf.GGUFValueType.INT64: "<q",
    gguf.GGUFValueType.FLOAT64: "<d",
}


@dataclass(frozen=True)
class ArrayInfo:
    """A long metadata array, kept as its element type and length only."""

    value_type: str
    length: int


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    type_name: str  # ggml type: Q4_K, MXFP4, F32, ...
    shape: tuple[int, ...]  # ggml order: innermost dimension first
    nbytes: int
    file_index: int  # which split part holds it

    @property
    def layer(self) -> int | None:
        match = re.match(r"^blk\.(\d+)\.", self.name)
        return int(match.group(1)) if match else None

    @property
    def is_expert(self) -> bool:
        return EXPERT_TENSOR.match(self.name) is not None


@dataclass(frozen=True)
class GGUFInfo:
    """One model's header (all split parts together)."""

    files: tuple[Path, ...]
    metadata: dict[str, object]
    tensors: tuple[GGUFTensor, ...]
    file_bytes: int

    @property
    def path(self) -> Path:
        return self.files[0]

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    @property
    def is_v4(self) -> bool:
        return self.architecture == V4_ARCHITECTURE

    @property
    def name(self) -> str:
        return str(self.metadata.get("general.name") or self.path.stem)

    def arch_value(self, key: str, default=None):
        """`{architecture}.{key}`, e.g. arch_value("block_count")."""
        return self.metadata.get(f"{self.architecture}.{key}", default)

    @property
    def n_layers(self) -> int:
        return int(self.arch_value("block_count", 0) or 0)

    @property
    def context_length(self) -> int:
        return int(self.arch_value("context_length", 0) or 0)

    @property
    def n_experts(self) -> int:
        return int(self.arch_value("expert_count", 0) or 0)

    @property
    def chat_template(self) -> str | None:
        value = self.metadata.get("tokenizer.chat_template")
        return str(value) if value else None

    @property
    def vocab_size(self) -> int:
        tokens = self.metadata.get("tokenizer.ggml.tokens")
        return tokens.length if isinstance(tokens, ArrayInfo) else len(tokens or ())

    @property
    def weight_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def expert_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors if t.is_expert)

    def expert_layers(self) -> list[int]:
        """Layers that hold routed-expert tensors, ascending."""
        return sorted({t.layer for t in self.tensors if t.is_expert and t.layer is not None})

    def type_counts(self) -> dict[str, int]:
        """ggml type -> bytes, largest first: what the quant mix is."""
        counts: dict[str, int] = {}
        for t in self.tensors:
            counts[t.type_name] = counts.get(t.type_name, 0) + t.nbytes
        return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


class _Reader:
    """Little-endian cursor over a header, with truncation reported as GGUFError."""

    def __init__(self, data: bytes, path: Path):
        self.data, self.pos, self.path = data, 0, path

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise _Short()
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str):
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.data):
            raise _Short()
        (value,) = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        n = self.unpack("<Q")
        return self.take(n).decode("utf-8", errors="replace")

    def skip_strings(self, count: int) -> None:
        data, pos, end = self.data, self.pos, len(self.data)
        for _ in range(count):
            if pos + 8 > end:
                raise _Short()
            (n,) = struct.unpack_from("<Q", data, pos)
            pos += 8 + n
        if pos > end:
            raise _Short()
        self.pos = pos

    def value(self, value_type: int):
        vt = gguf.GGUFValueType(value_type)
        if vt == gguf.GGUFValueType.STRING:
            return self.string()
        if vt == gguf.GGUFValueType.ARRAY:
            item_type = gguf.GGUFValueType(self.unpack("<I"))
            length = self.unpack("<Q")
            if length > _MAX_KEPT_ARRAY:
                if item_type == gguf.GGUFValueType.STRING:
                    self.skip_strings(length)
                elif item_type in _SCALAR:
                    self.take(length * struct.calcsize(_SCALAR[item_type]))
                else:
                    raise GGUFError(f"{self.path}: nested metadata arrays are not supported.")
                return ArrayInfo(item_type.name, length)
            return [self.value(item_type) for _ in range(length)]
        return self.unpack(_SCALAR[vt])


class _Short(Exception):
    pass


_HEADER_READ = 1 << 22  # first read; grows until the whole header fits


def _read_header(path: Path, file_index: int) -> tuple[dict, list[GGUFTensor], int, int]:
    """(metadata, tensors, data-section start, file size) of one file."""
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            magic = fh.read(4)
            if magic != b"GGUF":
                raise GGUFError(
                    f"{path} is not a GGUF file (it does not start with 'GGUF'). Pick a .gguf "
                    "model file, or for DeepSeek-V4 safetensors choose the checkpoint folder."
                )
            fh.seek(0)
            want = _HEADER_READ
            while True:
                data = fh.read(want) if want < size else (fh.seek(0), fh.read())[1]
                try:
                    return _parse(data, path, file_index, size)
                except _Short:
                    if len(data) >= size:
                        raise GGUFError(
                            f"{path} is cut short: its header ends after {size:,} bytes. The "
                            "download or copy did not finish; get the file again."
                        ) from None
                    fh.seek(0)
                    want *= 4
    except OSError as exc:
        raise GGUFError(f"{path} could not be read ({exc.strerror or exc}).") from exc


def _parse(data: bytes, path: Path, file_index: int, size: int):
    r = _Reader(data, path)
    r.take(4)
    version = r.unpack("<I")
    if version not in (2, 3):
        raise GGUFError(
            f"{path} is GGUF version {version}; llama.cpp reads versions 2 and 3. Get a file "
            "made by a current converter."
        )
    n_tensors, n_kv = r.unpack("<Q"), r.unpack("<Q")
    metadata: dict[str, object] = {}
    for _ in range(n_kv):
        key = r.string()
        try:
            metadata[key] = r.value(r.unpack("<I"))
        except ValueError as exc:  # an unknown value type: a damaged header
            raise GGUFError(f"{path} has a damaged header near key {key!r} ({exc}).") from exc
    raw = []
    for _ in range(n_tensors):
        name = r.string()
        n_dims = r.unpack("<I")
        shape = tuple(r.unpack("<Q") for _ in range(n_dims))
        type_id = r.unpack("<I")
        offset = r.unpack("<Q")
        raw.append((name, shape, type_id, offset))
    alignment = int(metadata.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT) or 32)
    data_start = -(-r.pos // alignment) * alignment
    tensors = []
    end = data_start
    for name, shape, type_id, offset in raw:
        try:
            qtype = gguf.GGMLQuantizationType(type_id)
            block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise GGUFError(
                f"{path}: tensor {name} has ggml type {type_id}, which this build does not know. "
                "The file may need a newer llama.cpp; or it is damaged."
            ) from None
        n = 1
        for d in shape:
            n *= d
        nbytes = n // block * block_bytes
        tensors.append(GGUFTensor(name, qtype.name, shape, nbytes, file_index))
        end = max(end, data_start + offset + nbytes)
    if end > size:
        raise GGUFError(
            f"{path} is cut short: its tensors need {end:,} bytes and the file has {size:,} "
            f"({(end - size) / (1 << 20):,.1f} MiB missing). The download or copy did not "
            "finish; get the file again."
        )
    return metadata, tensors, data_start, size


def split_parts(path: Path) -> list[Path]:
    """All parts of a split GGUF given any one of them (or just [path])."""
    match = _SPLIT_NAME.match(path.name)
    if not match:
        return [path]
    count = int(match.group("count"))
    stem = match.group("stem")
    parts = [path.with_name(f"{stem}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    missing = [p.name for p in parts if not p.exists()]
    if missing:
        raise GGUFError(
            f"{path.name} is part of a {count}-part model and {len(missing)} part(s) are missing "
            f"from {path.parent}: {', '.join(missing[:4])}{' …' if len(missing) > 4 else ''}. "
            "Download every part into the same folder."
        )
    return parts


def read_gguf(path: str | Path, *, check_architecture: bool = True) -> GGUFInfo:
    """Read a GGUF model's header (every split part); refuse what llama.cpp cannot load."""
    path = Path(path).expanduser()
    if path.is_dir():
        found = sorted(path.glob("*.gguf"))
        if not found:
            raise GGUFError(f"{path} holds no .gguf file. Pick the model file itself.")
        path = found[0]
    if not path.exists():
        raise GGUFError(f"{path} does not exist. Check the path in Model ▸ Settings….")
    parts = split_parts(path)
    metadata: dict[str, object] = {}
    tensors: list[GGUFTensor] = []
    total = 0
    for index, part in enumerate(parts):
        meta, part_tensors, _start, size = _read_header(part, index)
        if index == 0:
            metadata = meta
        tensors.extend(part_tensors)
        total += size
    expected = metadata.get("split.tensors.count")
    if expected is not None and int(expected) != len(tensors):
        raise GGUFError(
            f"{path.name}: the split parts hold {len(tensors)} tensors but the first part "
            f"announces {expected}. Some parts belong to another model or version; download "
            "them again."
        )
    info = GGUFInfo(tuple(parts), metadata, tuple(tensors), total)
    if check_architecture:
        check_loadable(info)
    return info


def check_loadable(info: GGUFInfo) -> None:
    arch = info.architecture
    if not arch:
        raise GGUFError(
            f"{info.path.name} names no architecture (general.architecture is missing), so "
            "llama.cpp cannot tell how to run it. Get the model from a current converter."
        )
    if arch == "clip" or info.metadata.get("general.type") in ("mmproj", "clip-vision"):
        raise GGUFError(
            f"{info.path.name} is a vision/audio projector (mmproj), not a language model. "
            "Pick the model's main .gguf file."
        )
    if arch not in LLAMACPP_ARCHITECTURES:
        raise GGUFError(
            f"{info.path.name} is a '{arch}' model, an architecture the bundled llama.cpp "
            "(llama-cpp-python 0.3.36) cannot run. Pick a GGUF of a supported model, e.g. "
            "DeepSeek-V4-Flash (deepseek4)."
        )
    if not info.tensors:
        raise GGUFError(
            f"{info.path.name} holds no tensors (a vocabulary-only file?). Pick the model file."
        )


def inventory(info: GGUFInfo) -> list[dict]:
    """Bytes per tensor, as plain dicts {name, nbytes, layer, expert, type}."""
    return [
        {
            "name": t.name,
            "nbytes": t.nbytes,
            "layer": t.layer,
            "expert": t.is_expert,
            "type": t.type_name,
        }
        for t in info.tensors
    ]
