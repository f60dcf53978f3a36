"""A V4 checkpoint that exists only in memory: random weights in the official formats, no files.

The real V4-Flash checkpoint is 160 GB; a machine lent for measurements may have the RAM and VRAM
to hold the model but not the disk to store it. `SyntheticCheckpoint` answers the reader's
interface (`info`, `raw`, `tensor`, `scale_of`, names) with tensors that `RandomWeights` makes on
first use, exactly what `write_random` would have written for the same seed, so `load_runtime`
builds the full model from it with any plan that keeps every expert in memory.

Routed experts can share storage: with `expert_pool=P` expert e of every layer is a view of one of
P generated experts (its raw bytes alias), so making the model costs seconds instead of the
~30 minutes 11,008 distinct experts take to draw. The runtime still copies each expert it keeps
into its own pinned/pageable buffer or VRAM slot, so the bytes a decode step reads are distinct
memory, as with a real checkpoint; only memory-mapped (disk) placement would read the shared
bytes, which is why `load_runtime` refuses a plan that pages experts from disk for this source.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from flashdesk.engine.checkpoint.reader import TORCH_DTYPES, Checkpoint, TensorInfo
from flashdesk.engine.checkpoint.writer import RandomWeights, is_quantized_part
from flashdesk.engine.config import ModelConfig
from flashdesk.engine.inventory import inventory

MEMORY = Path("<memory>")


class SyntheticCheckpoint(Checkpoint):
    """Random official-format weights made on demand and kept (one copy per tensor)."""

    def __init__(
        self, config: ModelConfig, seed: int = 0, expert_pool: int | None = None, name: str = ""
    ) -> None:
        super().__init__(Path(f"<synthetic {name or 'model'}>"), config)
        if expert_pool is not None and not 1 <= expert_pool <= config.n_routed_experts:
            raise ValueError(
                f"expert_pool must be in [1, {config.n_routed_experts}], got {expert_pool}"
            )
        self.seed = seed
        self.expert_pool = expert_pool
        self._source = RandomWeights(config, seed)
        self._specs = inventory(config).by_name
        first = config.main_layers[0].prefix
        self._pool_prefix = first + "ffn.experts."
        for spec in self._specs.values():
            nbytes = int(torch.Size(spec.shape).numel()) * TORCH_DTYPES[spec.dtype].itemsize
            self._infos[spec.name] = TensorInfo(
                spec.name, spec.dtype, tuple(spec.shape), MEMORY, 0, nbytes, spec.name
            )
        self._values: dict[str, torch.Tensor] = {}

    def _source_name(self, name: str) -> str:
        """The name whose values `name` holds: itself, or its pool expert (same shapes)."""
        spec = self._specs[name]
        if self.expert_pool is None or spec.expert is None:
            return name
        part = name.split(f"experts.{spec.expert}.", 1)[1]
        return f"{self._pool_prefix}{spec.expert % self.expert_pool}.{part}"

    def raw(self, name: str) -> torch.Tensor:
        """The tensor as stored (same dtypes as a file's `raw`), made on first use."""
        self.info(name)  # unknown names raise the reader's message
        key = self._source_name(name)
        value = self._values.get(key)
        if value is None:
            value = self._make(key)
        return value

    def _make(self, name: str) -> torch.Tensor:
        spec = self._specs[name]
        if is_quantized_part(spec):
            base = name.rsplit(".", 1)[0]
            codes, scales = self._source.make_pair(base)
            w_dtype = TORCH_DTYPES[self._specs[base + ".weight"].dtype]
            s_dtype = TORCH_DTYPES[self._specs[base + ".scale"].dtype]
            self._values[base + ".weight"] = codes.contiguous().view(w_dtype)
            self._values[base + ".scale"] = scales.contiguous().view(s_dtype)
            return self._values[name]
        parts = list(self._source.plain(spec))
        value = torch.cat(parts) if len(spec.shape) > 1 or len(parts) > 1 else parts[0]
        value = value.reshape(spec.shape).to(TORCH_DTYPES[spec.dtype]).contiguous()
        self._values[name] = value
        return value

    @property
    def shares_expert_storage(self) -> bool:
        """Experts alias a pool: only copies of them (pinned, pageable, VRAM) are distinct."""
        return self.expert_pool is not None

    def resident_bytes(self) -> int:
        """Host bytes of the tensors made so far."""
        return sum(t.numel() * t.element_size() for t in self._values.values())

    def close(self) -> None:
        self._values.clear()


FILL_ROWS = 65536  # rows encoded per step while filling (bounds the float32 temporaries)


def fill_context(state, config: ModelConfig, position: int, seed: int = 0) -> None:
    """Make `state` (empty, of a model with `config`) look as if `position` tokens had been
    read: random window rows and compressed entries and index keys, in the state's own
    formats, the stores reserved with room to grow. For timing decode and prompt calls at a
    depth without prefilling up to it (at 1M tokens a CPU would take hours); what such a state
    attends to is noise. Compressor carries stay empty: `position` is rounded down to a
    multiple of every compress ratio, so no window is half-filled."""
    ratios = [s.compress_ratio for s in config.main_layers if s.compress_ratio]
    step = math.lcm(*ratios) if ratios else 1
    position -= position % step
    gens: dict[torch.device, torch.Generator] = {}

    def random_rows(n: int, width: int, device: torch.device) -> torch.Tensor:
        """Drawn where the rows live (a GPU fills a 1M-token context's rows in seconds)."""
        if device not in gens:
            gens[device] = torch.Generator(device=device).manual_seed(seed)
        return torch.randn(n, width, generator=gens[device], device=device) * 0.5

    for spec, layer in zip(config.main_layers, state.layers, strict=True):
        ring = layer.window
        shown = min(ring.size, position)
        if shown:
            ring.write(random_rows(shown, ring.codec.width, ring.device), position - shown)
        for store in (layer.kv_entries, layer.index_keys):
            if store is None:
                continue
            n = position // spec.compress_ratio
            # room for the next 64 rows (a benchmark's steps): a store grows by doubling, which at
            # 1M tokens copies ~0.5 GB; more would also enlarge a captured GPU step, which reads
            # every row of its stores' capacity
            store.reserve(n + 64)
            for i in range(store.n, n, FILL_ROWS):
                store.append(random_rows(min(FILL_ROWS, n - i), store.width, store.device))
    state.position = position
