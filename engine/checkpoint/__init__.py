"""The official DeepSeek-V4 checkpoint: read in place (lazy, memory-mapped), verify, and write.

`Checkpoint.open(path)` reads a folder with `model.safetensors.index.json` and its shards (or one
`.safetensors` file) without loading it; `write_checkpoint` / `write_random` produce the exact
official layout for tests and benchmarks.
"""

from flashdesk.engine.checkpoint.reader import Checkpoint, TensorInfo, VerifyReport
from flashdesk.engine.checkpoint.safetensors_file import CheckpointError
from flashdesk.engine.checkpoint.writer import RandomWeights, write_checkpoint, write_random

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "RandomWeights",
    "TensorInfo",
    "VerifyReport",
    "write_checkpoint",
    "write_random",
]
