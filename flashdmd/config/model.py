"""The ``model`` section: which family, where its weights are, LoRA and the 2-D toy's mixture.

Values marked [INF] are inferred defaults, not paper values (../shared/research/flashdmd_spec.md
section 6). The family table below holds the two facts about each family the config itself
needs (its noise schedule, for the student-step range, and its number of CLIP text encoders);
flashdmd/nets/families.py holds everything else, and tests/config checks that the two agree.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from flashdmd.config.rules import Bound, Scope, setting

Family = Literal["sd15", "sdxl", "sd3", "tiny-sd15", "tiny-sdxl", "tiny-sd3", "gmm2d"]
# family -> (noise schedule, CLIP text encoders)
FAMILIES: dict[str, tuple[str, int]] = {
    "sd15": ("vp", 1), "sdxl": ("vp", 2), "sd3": ("flow", 2),
    "tiny-sd15": ("vp", 1), "tiny-sdxl": ("vp", 2), "tiny-sd3": ("flow", 2), "gmm2d": ("vp", 0),
}
# the timesteps a student step may take: VP schedules index 0..T-1 (spec 1.2); rectified flow
# uses t = T sigma with sigma in (0, 1] (spec 1.2 option (a)), so 1..T
STEP_RANGE = {"vp": (0, 999), "flow": (1, 1000)}
PREDICTIONS = {"vp": ("", "epsilon", "v_prediction"), "flow": ("", "flow")}
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]


def schedule_of(family: str) -> str:
    return FAMILIES[family][0]


@dataclass
class LoraConfig:
    enabled: bool = False
    rank: int = setting(64, ge=1, le=4096)  # [INF] spec 6 #12: rank 64 on attention + MLP for SD3-Medium
    alpha: float = setting(64.0, gt=0, le=1e6)
    target_modules: list[str] = setting(LORA_TARGETS, min_len=1, item=Bound(min_len=1, max_len=200),
                                        why="LoRA needs at least one layer name to adapt")


@dataclass
class GMMConfig:
    """The exact 2-D toy world (DESIGN.md, toy world 1); read by model.family=gmm2d only."""

    num_modes: int = setting(8, ge=1, le=1024)
    radius: float = setting(4.0, gt=0, le=1e6)  # modes on a circle unless ``means`` is given
    means: list[list[float]] = field(default_factory=list)
    weights: list[float] = setting([], item=Bound(ge=0))  # empty -> uniform
    std: float = setting(0.3, gt=0, le=1e6)
    reward_mode: int = setting(0, ge=0)  # stage-2 toy reward: closeness to this mode
    # mlp: an MLP pretrained on samples (cached; its capacity follows the modes' width, flashdmd/nets/gmm2d.py);
    # exact: the mixture's closed-form denoiser, the true score for any mixture, but its students
    # (exact + MLP correction) do not distil on this toy (flashdmd/nets/gmm2d.py)
    teacher: Literal["mlp", "exact"] = "mlp"
    teacher_steps: int = setting(3000, ge=1, le=10**7)  # pretraining iterations of the mlp teacher
    hidden: int = setting(256, ge=1, le=65536)  # width of the mlp teacher / of the students' MLP correction

    def validate(self, rules: Scope) -> None:
        modes = len(self.means) or self.num_modes
        rules.check(not self.weights or len(self.weights) == modes, "weights", "must have one entry per mode")
        rules.check(not self.weights or sum(self.weights) > 0, "weights", "must have a positive sum")
        rules.check(all(len(m) == 2 for m in self.means), "means", "must be 2-D points [x, y]")
        rules.check(self.reward_mode < modes, ("reward_mode", "num_modes", "means"), "must index a mode")


@dataclass
class ModelConfig:
    family: Family = "tiny-sdxl"
    teacher: str = ""  # local diffusers folder or hub id; "" -> the family's default
    revision: str = ""
    vae: str = ""  # "" -> the teacher's own VAE subfolder
    text_encoders: list[str] = field(default_factory=list)  # [] -> the teacher's subfolders
    use_t5: bool = False  # SD3 only; T5 is large and can be left out
    sam: str = ""  # SAM vision encoder for the Pixel-GAN discriminator (spec 1.8)
    sam_taps: list[int] = setting([], item=Bound(ge=1, le=256))  # [] -> 4 evenly spaced blocks [INF]
    reward_model: str = ""  # latent reward model (LRM) weights for stage 2 (spec 2.2)
    prediction_type: Literal["", "epsilon", "v_prediction", "flow"] = ""  # "" -> family default
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    cache_dir: str = ""  # where tiny presets write their save_pretrained folders; "" -> run_root
    lora: LoraConfig = field(default_factory=LoraConfig)
    gmm: GMMConfig = field(default_factory=GMMConfig)

    def validate(self, rules: Scope) -> None:
        schedule, encoders = FAMILIES[self.family]
        toy, tiny = self.family == "gmm2d", self.family.startswith("tiny-")
        rules.check(self.prediction_type in PREDICTIONS[schedule], ("prediction_type", "family"),
                    f"must be one of {PREDICTIONS[schedule]} for a {schedule.upper()} family")
        rules.check(not self.use_t5 or schedule == "flow", ("use_t5", "family"), "applies to SD3 only",
                    "set model.family=sd3 or tiny-sd3, or model.use_t5=false")
        rules.check(not self.text_encoders or len(self.text_encoders) == encoders, ("text_encoders", "family"),
                    f"must list {encoders} folder(s), one per text encoder of model.family={self.family}")
        real_only = [k for k in ("teacher", "revision") if getattr(self, k)] or ["teacher"]
        rules.check(not (tiny and (self.teacher or self.revision)), (*real_only, "family"),
                    "must be empty for tiny families: their weights are built locally",
                    f"use model.family={self.family.removeprefix('tiny-')} for real weights")
        weights = {"teacher": self.teacher, "revision": self.revision, "vae": self.vae, "sam": self.sam,
                   "reward_model": self.reward_model, "text_encoders": self.text_encoders, "sam_taps": self.sam_taps}
        given = [k for k, v in weights.items() if v] or ["teacher"]
        rules.check(not toy or not any(weights.values()), (*given, "family"),
                    "is not read by model.family=gmm2d (the toy builds its own networks)", "leave it empty")
        rules.check(toy or self.gmm == GMMConfig(), ("gmm", "family"), "is only read by model.family=gmm2d",
                    "set model.family=gmm2d or remove the model.gmm settings")
        rules.check(not (toy and self.lora.enabled), ("lora.enabled", "family"),
                    "needs an image family (sd15, sdxl, sd3 or tiny-*); the toy's MLP has no attention layers")
