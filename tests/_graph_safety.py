"""What CUDA graph capture needs of a function, checked on the CPU.

A captured graph replays the same kernels on the same addresses with the scalars they had at
capture; it breaks when a function reads a value back to the host, allocates by a host-known
size, or bakes a host-side number that changes from call to call. `Recorder` logs every torch
operation a call dispatches as (operation, arguments) with tensors described by shape, dtype and
stride, plus their address when they existed before the call (buffers a graph would read or
write in place); two calls that a graph could replay for each other log the same list.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from flashdesk.engine.config import ModelConfig
from flashdesk.engine.runtime import LayerPlacement, Placement

# Operations that read a device value on the host (a sync, not allowed while capturing) or copy
# host data in (`torch.tensor(...)` inside the step).
HOST_READS = {
    "_local_scalar_dense",
    "item",
    "nonzero",
    "masked_select",
    "unique",
    "_unique",
    "_unique2",
    "unique_dim",
    "unique_consecutive",
    "repeat_interleave",
    "lift_fresh",
    "lift_fresh_copy",
}


# Indexing by a boolean mask sizes its result by the count of true values (on CUDA a nonzero).
MASK_INDEXING = {"index", "index_put", "index_put_", "_index_put_impl_"}


def _has_mask(args) -> bool:
    indices = args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else ()
    return any(
        isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8) for t in indices
    )


class Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[tuple] = []
        self.host_reads: list[str] = []
        self._made: set[int] = set()  # storages allocated during the call

    def _describe(self, x):
        if isinstance(x, torch.Tensor):
            storage = x.untyped_storage().data_ptr()
            where = "new" if storage in self._made else x.data_ptr()
            return ("T", tuple(x.shape), x.dtype, x.stride(), str(x.device), where)
        if isinstance(x, torch.UntypedStorage):  # Triton's interpreter moves data through these
            return ("S", x.nbytes())
        if isinstance(x, (list, tuple)):
            return tuple(self._describe(v) for v in x)
        if isinstance(x, dict):
            return tuple(sorted((k, self._describe(v)) for k, v in x.items()))
        return repr(x)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        entry = (str(func), self._describe(args), self._describe(kwargs))
        inputs = {
            t.untyped_storage().data_ptr()
            for t in tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor)
        }
        out = func(*args, **kwargs)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self._made.add(t.untyped_storage().data_ptr())
        self.ops.append(entry)
        name = func.overloadpacket.__name__
        if name in HOST_READS or (name in MASK_INDEXING and _has_mask(args)):
            self.host_reads.append(str(func))
        return out


def record(fn) -> Recorder:
    with Recorder() as rec:
        fn()
    return rec


# The model the CPU and GPU tests of the captured decode step share: window 8, CSA (ratio 4, top-4
# indexer) and HCA at ratio 16 so that short runs close windows of both; layers 0-1 hash-routed.
GRAPH_CONFIG = ModelConfig.tiny(
    num_hidden_layers=5, num_nextn_predict_layers=0, compress_ratios=(0, 4, 16, 4, 16)
)


def graph_placement(name: str, device: str = "cpu", config: ModelConfig = GRAPH_CONFIG):
    """ "host" (every expert pinned), "zero-copy" (every expert pinned, the device reading a
    third of them in place), "cache" (3 cached per layer), "all cached", or "mixed" (layer 2
    whole on the device, layer i caching i % 4 experts, the rest pinned / pageable)."""
    n = config.n_routed_experts
    if name == "host":
        return Placement.uniform(config, "pinned", device)
    if name == "zero-copy":
        layer = LayerPlacement(pinned=tuple(range(n)), zero_copy=tuple(range(0, n, 3)))
        return Placement(device, tuple(layer for _ in config.main_layers))
    if name == "cache":
        return Placement.uniform(config, "pageable", device, cached=3)
    if name == "all cached":
        return Placement.uniform(config, "pageable", device, cached=n)
    layers = []
    for i in range(len(config.main_layers)):
        dev = tuple(range(n)) if i == 2 else tuple(range(i % 4))
        rest = [e for e in range(n) if e not in dev]
        layers.append(
            LayerPlacement(device=dev, pinned=tuple(rest[::2]), pageable=tuple(rest[1::2]))
        )
    return Placement(device, tuple(layers))
