"""The real backend: our V4 engine (checkpoint reader, torch model, chat encoding, Session).

With a checkpoint folder in the settings it opens and verifies that folder, plans the GPU/RAM
placement for this machine (offload.plan) and loads it through the hybrid runtime (engine.runtime:
routed experts stay stored FP4 bytes in RAM, the rest on the GPU or CPU); without one it uses the tiny native test model (random weights in the official layout, written
once into the data folder by our own writer) so every part of the app can be tried on any machine.
The V4 tokenizer is the folder's `tokenizer.json`, or the bundled one for the test model (which has
the full V4 vocabulary, so prompts encode exactly as for the real model).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from flashdesk.app.backend import (
    MODE_VALUES,
    Backend,
    BackendError,
    LoadCancelled,
    ModelInfo,
    Progress,
    Prompt,
    PromptTooLong,
    Sampling,
    TurnEvent,
    TurnStats,
    check_mode,
    engine_messages,
)

log = logging.getLogger("flashdesk.app.engine_backend")

TEST_MODEL_DIR = "test-model"
TEST_MODEL_SEED = 0
V4_VOCAB = 129_280


def gguf_available() -> bool:
    """Whether the gguf extra (llama-cpp-python) is installed, without importing it."""
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def test_model_config():
    """The tiny config with the full V4 vocabulary (so the real tokenizer's ids are valid)."""
    from flashdesk.engine.config import ModelConfig

    return ModelConfig.tiny(vocab_size=V4_VOCAB)


def built_bytes(ckpt, device: str = "cpu", with_mtp: bool = False) -> int:
    """Memory the runtime builds on `device` beside the routed experts (those stay stored bytes,
    which the planner places): each tensor as the runtime holds it (`TensorSpec.gpu_bytes`: FP8
    and the BF16 head as stored, norms/router/compressors widened to float32; the CPU holds the
    same or less), the MTP block only `with_mtp` (speculative decoding; its experts stay
    memory-mapped), and on a GPU the embedding too (it stays in host memory)."""
    from flashdesk.engine.inventory import EMBED, MTP, ROUTED_EXPERTS, inventory

    skip = {ROUTED_EXPERTS} | ({EMBED} if device != "cpu" else set())
    return sum(
        t.gpu_bytes
        for t in inventory(ckpt.config).tensors
        if t.component not in skip and (with_mtp or t.category != MTP)
    )


def drafts_with_mtp(ckpt, device: str) -> bool:
    """Whether the runtime should draft with the checkpoint's MTP block (speculative decoding):
    in the CPU mode (the only one it runs in so far) where the block is there, unless
    FLASHDESK_MTP=0. A stream stops drafting by itself where the drafts do not pay."""
    return device == "cpu" and os.environ.get("FLASHDESK_MTP", "1").strip() != "0" and ckpt.has_mtp


def check_memory(needed: int, device: str) -> None:
    """Refuse before loading when the built model cannot fit (instead of swapping to a halt)."""
    import psutil

    if device == "cuda":
        import torch

        free, _total = torch.cuda.mem_get_info()
        where, available = "GPU memory", int(free)
    else:
        where, available = "RAM", int(psutil.virtual_memory().available)
    if needed > available * 0.9:
        gib = 1 << 30
        raise BackendError(
            f"The attention, shared experts and head of this checkpoint need about "
            f"{needed / gib:,.1f} GiB of {where} once built, and {available / gib:,.1f} GiB is "
            "free. Close other programs, run the hardware-fit wizard (Model ▸ Hardware fit…) for "
            "a plan, or use the test model (Model ▸ Settings…, empty checkpoint folder).",
            kind="oom",
        )


def ensure_test_model(folder: Path, progress: Progress | None = None) -> Path:
    """Write the test checkpoint into `folder` unless a complete one is already there."""
    from flashdesk.engine.checkpoint import Checkpoint, CheckpointError, write_random

    folder = Path(folder)
    if (folder / "config.json").exists():
        try:
            with Checkpoint.open(folder) as ckpt:
                if ckpt.verify().ok:
                    return folder
        except CheckpointError as exc:
            log.warning("test model in %s is damaged (%s); writing it again", folder, exc)

    def report(name: str, done: int, total: int) -> None:
        if progress is not None and total:
            progress(0.4 * done / total, "Writing the test model (first start only)")

    write_random(folder, test_model_config(), seed=TEST_MODEL_SEED, overwrite=True, progress=report)
    return folder


class EngineBackend(Backend):
    def __init__(
        self,
        model_path: str | Path | None,
        data_folder: Path,
        *,
        context_limit: int = 8192,
        device: str | None = None,
        plan_summary: str = "",
        plan: dict | None = None,
        demo: bool = False,
    ):
        # demo: with no model path, run the real small GGUF demo model when it is installed
        # (engine/gguf/demo.py) instead of the tiny random-weights V4 model.
        self.demo = demo
        self.model_path = Path(model_path).expanduser() if model_path else None
        self.data_folder = Path(data_folder)
        self.requested_context = int(context_limit)
        self.device = device
        self.plan_summary = plan_summary
        self.saved_plan = dict(plan or {})  # the wizard's choices the load re-plans with
        self.model = None
        self.tokenizer = None
        self.session = None
        self._lock = threading.Lock()

    # loading ------------------------------------------------------------------------------------
    def load(self, progress: Progress, is_cancelled: Callable[[], bool]) -> ModelInfo:
        import torch

        from flashdesk.engine.checkpoint import Checkpoint, CheckpointError
        from flashdesk.engine.generate import Session
        from flashdesk.engine.runtime import LoadCancelled as RuntimeLoadCancelled
        from flashdesk.engine.runtime import RuntimeLoadError, load_runtime
        from flashdesk.engine.tokenizer import TokenizerError, load_tokenizer

        gguf_path = self._gguf_path()
        if gguf_path is not None:
            return self._load_gguf(gguf_path, progress, is_cancelled)
        test_model = self.model_path is None
        progress(0.0, "Opening the checkpoint")
        try:
            folder = (
                ensure_test_model(self.data_folder / TEST_MODEL_DIR, progress)
                if test_model
                else self.model_path
            )
            if is_cancelled():
                raise LoadCancelled()
            ckpt = Checkpoint.open(folder)
            report = ckpt.verify()
        except CheckpointError as exc:
            raise BackendError(str(exc), kind="load") from exc
        except OSError as exc:
            raise BackendError(
                f"The checkpoint could not be read ({exc.strerror or exc}). Check the folder in "
                "Model ▸ Hardware fit… and that the disk is readable.",
                kind="load",
            ) from exc
        if not report.ok:
            listing = "\n".join(f"• {p}" for p in report.problems[:12])
            more = len(report.problems) - 12
            raise BackendError(
                f"The checkpoint in {folder} has {len(report.problems)} problem(s):\n{listing}"
                + (f"\n…and {more} more (see the log file)." if more > 0 else ""),
                kind="load",
            )
        start = 0.4 if test_model else 0.0
        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        # The runtime keeps routed experts as stored FP4 bytes (memory-mapped unless a plan pins
        # them); everything else is built on `device`. Check that part fits before building it.
        speculative = drafts_with_mtp(ckpt, device)
        check_memory(built_bytes(ckpt, device, with_mtp=speculative), device)
        config = ckpt.config
        ckpt.close()
        plan = None if test_model else self._plan_for(folder, progress)
        try:
            model = load_runtime(
                folder,
                plan=plan,
                device=device,
                progress=lambda f, what: progress(start + (0.95 - start) * f, what),
                cancel=is_cancelled,
                speculative=speculative,
            )
        except RuntimeLoadCancelled:
            raise LoadCancelled() from None
        except RuntimeLoadError as exc:
            raise BackendError(str(exc), kind=exc.kind) from exc
        except CheckpointError as exc:
            raise BackendError(str(exc), kind="load") from exc
        except (MemoryError, torch.OutOfMemoryError) as exc:
            raise BackendError(
                f"Not enough memory to load the model on {device} ({exc}). Run the hardware-fit "
                "wizard (Model ▸ Hardware fit…) to pick a smaller context or a different plan.",
                kind="oom",
            ) from exc
        for note in model.notes:
            log.info("runtime: %s", note)
        progress(0.97, "Loading the tokenizer")
        try:
            tokenizer = load_tokenizer(None if test_model else folder)
        except TokenizerError as exc:
            raise BackendError(str(exc), kind="load") from exc
        context = min(self.requested_context, int(config.max_position_embeddings))
        self._install(model, tokenizer, Session(model, tokenizer, context_limit=context))
        name = "V4 tiny" if test_model else (folder.name or str(folder))
        summary = self.plan_summary or model.describe()
        self.info = ModelInfo(
            name=name,
            context_limit=context,
            test_model=test_model,
            plan_summary=summary,
            device=device,
        )
        progress(1.0, "Ready")
        return self.info

    def _install(self, model, tokenizer, session) -> None:
        """Make the new model current, then release the previous one (its checkpoint mapping or
        llama.cpp context), whichever backend either came from."""
        with self._lock:
            old = self.model
            self.model, self.tokenizer, self.session = model, tokenizer, session
        if old is not None and old is not model and hasattr(old, "close"):
            old.close()

    def _plan_for(self, folder: Path, progress: Progress):
        """The planner's placement for this checkpoint (or DeepSeek-V4 GGUF) on this machine at
        the chosen context, with the wizard's KV format and VRAM reserve (probed with cached
        measurements); a plan that cannot fit is refused with its changes."""
        from flashdesk.fit import DoesNotFit, plan_for_loading

        progress(0.02, "Planning GPU and RAM placement")
        reserve = self.saved_plan.get("vram_reserve_bytes")
        try:
            plan, why = plan_for_loading(
                str(folder),
                self.requested_context,
                kv_dtype=self.saved_plan.get("kv_dtype") or "bf16",
                vram_reserve_gib=None if reserve is None else reserve / 2**30,
            )
        except DoesNotFit as exc:
            raise BackendError(str(exc), kind="oom") from exc
        if plan is None:
            log.warning("no plan for %s (%s); loading with experts memory-mapped", folder, why)
        return plan

    def _gguf_placement(self, path: Path, info, context: int, demo: bool, progress):
        """Where llama.cpp puts a GGUF: a DeepSeek-V4 file the user chose is planned as a
        checkpoint is (the wizard's KV format and VRAM reserve; the GPU only where this
        llama.cpp build can offload); other files (the demo model) run on the CPU."""
        from flashdesk.engine.gguf.backend import GGUFPlacement
        from flashdesk.engine.gguf.llama_glue import gpu_offload_supported

        plan = self._plan_for(path, progress) if info.is_v4 and not demo else None
        if plan is None:
            return GGUFPlacement(context=context)
        return GGUFPlacement.from_plan(
            plan, info.n_layers, gpu_offload=gpu_offload_supported(), context=context
        )

    def _gguf_path(self) -> Path | None:
        """The GGUF file to run: a .gguf model path, or the demo model when asked for and present."""
        if self.model_path is not None:
            path = self.model_path
            if path.suffix.lower() == ".gguf" or (
                path.is_dir() and any(path.glob("*.gguf")) and not (path / "config.json").exists()
            ):
                return path
            return None
        if self.demo:
            from flashdesk.engine.gguf.demo import demo_model_path

            if demo_model_path(required=False) is not None and gguf_available():
                return demo_model_path()
            log.info("demo model or llama-cpp-python not installed; using the tiny test model")
        return None

    def _load_gguf(self, path: Path, progress: Progress, is_cancelled) -> ModelInfo:
        """A GGUF model through llama.cpp (engine/gguf), driven by the same Session."""
        from flashdesk.engine.generate import Session

        try:
            from flashdesk.engine.gguf import GGUFError, GGUFUnavailable, open_gguf
            from flashdesk.engine.gguf.backend import LoadCancelledError
            from flashdesk.engine.gguf.demo import DEMO_NAME, demo_model_path
            from flashdesk.engine.gguf.metadata import read_gguf
        except ImportError as exc:  # the gguf extra is missing
            from flashdesk.engine.gguf.errors import GGUFUnavailable

            raise BackendError(str(GGUFUnavailable()), kind="load") from exc
        demo = self.model_path is None
        progress(0.0, "Reading the GGUF header")
        try:
            info = read_gguf(path)
            context = min(self.requested_context, info.context_length or self.requested_context)
            placement = self._gguf_placement(path, info, context, demo, progress)
            model, tokenizer = open_gguf(
                info,
                placement,
                progress=lambda f: (
                    progress(0.05 + 0.9 * f, "Loading weights"),
                    not is_cancelled(),
                )[1],
            )
        except LoadCancelledError:
            raise LoadCancelled() from None
        except (GGUFError, GGUFUnavailable) as exc:
            raise BackendError(str(exc), kind="load") from exc
        self._install(
            model, tokenizer, Session(model, tokenizer, context_limit=model.context_limit)
        )
        self.info = ModelInfo(
            name=DEMO_NAME if demo and path == demo_model_path(required=False) else info.name,
            context_limit=model.context_limit,
            test_model=False,
            plan_summary=placement.describe(),
            device="cpu" if placement.n_gpu_layers == 0 else "cuda",
            note="demo model" if demo else "",
        )
        progress(1.0, "Ready")
        return self.info

    def _need_model(self):
        if self.session is None:
            raise BackendError("No model is loaded yet. Load one from the Model menu.")
        return self.session

    # chat ---------------------------------------------------------------------------------------
    def encode(self, messages: Sequence[dict], mode: str) -> Prompt:
        from flashdesk.engine.chat import encode_messages

        self._need_model()
        check_mode(mode, self.info)
        gguf_info = getattr(self.model, "info", None)
        if gguf_info is not None and not gguf_info.is_v4:
            # Another architecture: its own chat template; it has no reasoning modes.
            from flashdesk.engine.gguf.prompt import encode_chat

            encoded = encode_chat(self.model, self.tokenizer, engine_messages(messages))
            return Prompt(encoded.ids, encoded.text, mode)
        encoded = encode_messages(
            engine_messages(messages), MODE_VALUES[mode], tokenizer=self.tokenizer
        )
        return Prompt(list(encoded.ids or []), encoded.text, mode)

    def count_tokens(self, text: str) -> int:
        if self.tokenizer is None:
            from flashdesk.engine.tokenizer import load_tokenizer

            return load_tokenizer().count(text)
        return self.tokenizer.count(text)

    def document_tokenizer(self):
        return self.tokenizer

    def stream(self, prompt: Prompt, sampling: Sampling) -> Iterator[TurnEvent]:
        from flashdesk.engine.generate import ContextOverflowError, SamplingParams

        session = self._need_model()
        params = SamplingParams(
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            seed=sampling.seed,
            max_tokens=sampling.max_tokens,
            stop_ids=tuple(getattr(self.model, "stop_ids", ())),  # a GGUF's end-of-turn tokens
        )
        try:
            for event in session.stream(prompt.ids, params):
                yield TurnEvent(
                    event.text, event.phase, TurnStats.from_any(event.stats), event.done
                )
        except ContextOverflowError as exc:
            raise PromptTooLong(exc.prompt_tokens, exc.context_limit) from exc

    def configure(
        self, model_path: str, context_limit: int, plan_summary: str, plan: dict | None = None
    ) -> None:
        self.model_path = Path(model_path).expanduser() if model_path else None
        self.requested_context = int(context_limit)
        self.plan_summary = plan_summary
        self.saved_plan = dict(plan or {})

    def cancel(self) -> None:
        if self.session is not None:
            self.session.cancel()
