"""Official-layout V4 checkpoints to GGUF with llama.cpp's own converter (for the peer checks).

llama.cpp's `convert_hf_to_gguf.py` (in the llama-cpp-python source distribution, with its own
`gguf-py`) converts a V4 folder: FP8 linears to Q8_0, FP4 experts repacked bit for bit to MXFP4,
BF16 kept, `mtp.*` skipped. For a *tight* peer (`exact=True`) a small wrapper, run in a subprocess
with that source on the path, makes every weight F32 instead: the converter's forced-type choice
returns F32 and the MXFP4 expert writer is replaced by our exact FP4 dequantization
(engine/quant.py). Nothing of llama.cpp is copied here; the source is found at run time:
`FLASHDESK_LLAMA_CPP_SRC`, or the cache that `fetch_llama_cpp_source()` fills.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from flashdesk.engine.gguf.errors import GGUFError

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
_SRC_SUBDIR = "vendor/llama.cpp"

# Run as `python -c WRAPPER SRC EXACT ARGS...`: patch the converter, then call its main().
_WRAPPER = r"""
import sys
from pathlib import Path

src, exact, args = Path(sys.argv[1]), sys.argv[2] == "1", sys.argv[3:]
sys.path[:0] = [str(src / "gguf-py"), str(src)]
import gguf  # the converter's own gguf-py (it knows deepseek4)
import conversion.deepseek as ds
import convert_hf_to_gguf as convert

if exact:
    import numpy as np
    from conversion.base import LazyTorchTensor
    from flashdesk.engine.quant import dequant_fp4

    def force_f32(self, name, new_name, bid, n_dims):
        return gguf.GGMLQuantizationType.F32

    def write_f32_experts(self, bid, proj, tensor_key):
        consumed, rows = [], []
        for eid in range(self.hparams["n_routed_experts"]):
            w = f"layers.{bid}.ffn.experts.{eid}.{proj}.weight"
            s = f"layers.{bid}.ffn.experts.{eid}.{proj}.scale"
            packed = LazyTorchTensor.to_eager(self.model_tensors[w]())
            scale = LazyTorchTensor.to_eager(self.model_tensors[s]())
            rows.append(dequant_fp4(packed.view(__import__("torch").uint8), scale).numpy())
            consumed += [w, s]
        self.gguf_writer.add_tensor(self.format_tensor_name(tensor_key, bid), np.stack(rows))
        return consumed

    ds.DeepseekV4Model.tensor_force_quant = force_f32
    ds.DeepseekV4Model._write_mxfp4_expert_tensor = write_f32_experts
    ds.DeepseekV4Model.prepare_tensors = ds.DeepseekV4Model.__mro__[1].prepare_tensors

sys.argv = ["convert_hf_to_gguf.py", *args]
convert.main()
"""


def default_source_cache() -> Path:
    base = os.environ.get("FLASHDESK_CACHE_DIR") or Path.home() / ".cache" / "flashdesk"
    return Path(base) / "llama-cpp-python-0.3.36-src"


def llama_cpp_source() -> Path | None:
    """The llama.cpp source tree holding convert_hf_to_gguf.py, if present on this machine."""
    candidates = []
    if os.environ.get("FLASHDESK_LLAMA_CPP_SRC"):
        candidates.append(Path(os.environ["FLASHDESK_LLAMA_CPP_SRC"]).expanduser())
    candidates.append(default_source_cache() / _SRC_SUBDIR)
    for path in candidates:
        for root in (path, path / _SRC_SUBDIR):
            if (root / "convert_hf_to_gguf.py").is_file() and (root / "gguf-py").is_dir():
                return root
    return None


def fetch_llama_cpp_source(dest: Path | None = None) -> Path:
    """Download llama-cpp-python's source distribution with pip and unpack it (installs and
    benchmarks; tests only look for it). `python -m flashdesk.engine.gguf.convert` runs this."""
    found = llama_cpp_source()
    if found is not None:
        return found
    dest = Path(dest or default_source_cache())
    with tempfile.TemporaryDirectory() as tmp:
        # --no-binary for this package only: its build tools (cmake, ninja) come as wheels.
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet"]
        cmd += ["--no-binary", "llama-cpp-python", "-d", tmp, LLAMA_CPP_PYTHON]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        archives = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if not archives:
            raise GGUFError(
                f"Could not download the {LLAMA_CPP_PYTHON} source (pip said: "
                f"{(done.stderr or done.stdout).strip()[-400:]}). Set FLASHDESK_LLAMA_CPP_SRC to "
                "an unpacked copy."
            )
        dest.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archives[0]) as tar:
            top = tar.getnames()[0].split("/")[0]
            tar.extractall(dest.parent / "_unpack", filter="data")
        if dest.exists():
            shutil.rmtree(dest)
        (dest.parent / "_unpack" / top).rename(dest)
        shutil.rmtree(dest.parent / "_unpack", ignore_errors=True)
    found = llama_cpp_source()
    if found is None:
        raise GGUFError(f"The unpacked source in {dest} has no convert_hf_to_gguf.py.")
    return found


def prepare_tokenizer(checkpoint: Path) -> None:
    """The converter reads the V4 tokenizer files from the checkpoint folder; copy ours in."""
    from flashdesk.engine.tokenizer import bundled_tokenizer_path

    bundled = bundled_tokenizer_path()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if not (checkpoint / name).exists() and (bundled.parent / name).exists():
            shutil.copy(bundled.parent / name, checkpoint / name)


def convert_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    *,
    exact: bool = False,
    source: Path | None = None,
    timeout: float = 3600,
) -> Path:
    """Convert an official-layout V4 folder to one GGUF file (exact: all weights F32)."""
    checkpoint, out = Path(checkpoint), Path(out)
    source = source or llama_cpp_source()
    if source is None:
        raise GGUFError(
            "llama.cpp's converter is not on this machine. Set FLASHDESK_LLAMA_CPP_SRC to an "
            f"unpacked {LLAMA_CPP_PYTHON} source, or call fetch_llama_cpp_source()."
        )
    prepare_tokenizer(checkpoint)
    args = [str(checkpoint), "--outfile", str(out), "--outtype", "f32" if exact else "auto"]
    cmd = [sys.executable, "-c", _WRAPPER, str(source), "1" if exact else "0", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0 or not out.exists():
        raise GGUFError(
            f"llama.cpp's converter failed on {checkpoint} (exit {done.returncode}):\n"
            + (done.stderr or done.stdout)[-2000:]
        )
    return out


if __name__ == "__main__":
    print(fetch_llama_cpp_source())
