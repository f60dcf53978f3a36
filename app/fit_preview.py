"""The planner's time-to-first-token for a prompt of N tokens, for the saved plan on this machine.

The wizard saves the machine's profile (`profile.json`) and the plan's options; from them this
rebuilds the plan once (figures take ~0.5 s, so it is built off the GUI thread) and answers
"how long will reading this prompt take" for any length, as the documents preview needs.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("flashdesk.app.fit_preview")

PROFILE_NAME = "profile.json"


class TtftPredictor:
    def __init__(self, plan: dict, profile, figures, built_plan, efficiency=None):
        from flashdesk.offload.predict import Efficiency

        self.plan_info = plan
        self.profile = profile
        self.figures = figures
        self.plan = built_plan
        self.efficiency = efficiency or Efficiency()  # the factors the wizard predicted with
        self.model = plan.get("model", "the model")
        self._cache: dict[int, float | None] = {}

    @classmethod
    def build(cls, data_folder: Path, plan: dict) -> TtftPredictor | None:
        """None when there is no saved plan or profile (the wizard has not been run)."""
        from flashdesk.app.wizard import figures_for, preset_choice, test_model_choice
        from flashdesk.offload.plan import PlanOptions
        from flashdesk.offload.predict import Efficiency, plan_and_predict
        from flashdesk.offload.probe import HardwareProfile, ProfileError

        path = Path(data_folder) / PROFILE_NAME
        if not plan or not plan.get("context") or not path.exists():
            return None
        try:
            profile = HardwareProfile.load(path)
        except (ProfileError, OSError, ValueError) as exc:
            log.warning("saved profile %s unusable: %s", path, exc)
            return None
        kind = plan.get("model_kind")
        if kind == "test":
            choice = test_model_choice()
        elif kind == "checkpoint" and plan.get("model_path"):
            from flashdesk.app.wizard import ModelChoice
            from flashdesk.engine.config import ModelConfig

            try:
                config = ModelConfig.from_dir(plan["model_path"])
            except (OSError, ValueError) as exc:
                log.warning("checkpoint config unreadable for the preview: %s", exc)
                return None
            choice = ModelChoice("checkpoint", plan.get("model", ""), config, plan["model_path"])
        elif kind == "gguf" and plan.get("model_path"):
            from flashdesk.app.wizard import ModelChoice

            try:
                from flashdesk.engine.gguf.metadata import read_gguf

                info = read_gguf(plan["model_path"])
            except (ImportError, OSError, ValueError) as exc:
                log.warning("GGUF header unreadable for the preview: %s", exc)
                return None
            choice = ModelChoice("gguf", plan.get("model", ""), info, plan["model_path"])
        else:
            choice = preset_choice(plan.get("model") or "DeepSeek-V4-Flash")
        try:
            figures = figures_for(choice)
        except ValueError as exc:  # a GGUF replaced by one the planner does not model
            log.warning("no figures for the preview: %s", exc)
            return None
        options = PlanOptions(
            context=int(plan["context"]),
            kv_dtype=plan.get("kv_dtype", "bf16"),
            vram_reserve_bytes=plan.get("vram_reserve_bytes"),
        )
        eff = Efficiency.load_or_defaults()
        built, _ = plan_and_predict(figures, profile, options, efficiency=eff)
        return cls(plan, profile, figures, built, eff)

    def ttft_s(self, prompt_tokens: int) -> float | None:
        from flashdesk.offload.predict import predict

        key = max(1, int(prompt_tokens) // 256 * 256 or 1)
        if key not in self._cache:
            self._cache[key] = predict(
                self.plan, self.figures, self.profile, key, self.efficiency
            ).ttft_s
        return self._cache[key]
