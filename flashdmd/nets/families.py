"""Per-family facts: schedule, latent layout, VAE scaling, resolution, student steps, folder layout.

One ``Family`` per name the registry accepts (sd15, sdxl, sd3 and their tiny-* twins). A tiny
family shares its ``kind`` (and therefore every adapter and the loader) with the real one; only
the weights' origin and the sizes differ. Values follow the public diffusers configs of
runwayml/stable-diffusion-v1-5, stabilityai/stable-diffusion-xl-base-1.0 and
stabilityai/stable-diffusion-3-medium-diffusers; the SD3 student steps are the spec's option (a)
of section 1.2 ([INF]).
"""
from __future__ import annotations

from dataclasses import dataclass

from flashdmd.diffusion.schedules import FlowSchedule, Schedule, VPSchedule


@dataclass(frozen=True)
class Family:
    name: str
    kind: str  # "sd15" | "sdxl" | "sd3": which adapters, text encoders and folder layout
    tiny: bool
    pipeline_class: str  # model_index.json "_class_name" of a diffusers folder of this kind
    denoiser_folder: str  # "unet" or "transformer"
    text_folders: tuple[str, ...]  # CLIP encoders, in order; SD3's optional T5 is text_encoder_3
    latent_channels: int
    vae_downsample: int  # pixels per latent cell
    scaling_factor: float
    shift_factor: float
    resolution: int  # native training resolution
    student_timesteps: tuple[int, ...]  # spec 1.2
    default_teacher: str  # hub id used when model.teacher is ""
    default_sam: str  # SAM encoder for the Pixel-GAN (spec 1.8: ViT-L by default)
    default_prediction: str  # "epsilon" | "flow"

    def schedule(self, prediction: str = "") -> Schedule:
        """The family's noise schedule; ``prediction`` overrides the default (VP: epsilon or v)."""
        prediction = prediction or self.default_prediction
        if self.kind == "sd3":
            if prediction != "flow":
                raise ValueError(f"family {self.name} is a rectified-flow model; model.prediction_type must be "
                                 f"'' or 'flow', got {prediction!r}")
            return FlowSchedule(shift=3.0, num_train_timesteps=1000)
        if prediction not in ("epsilon", "v_prediction"):
            raise ValueError(f"family {self.name} is a VP model; model.prediction_type must be '', 'epsilon' or "
                             f"'v_prediction', got {prediction!r}")
        return VPSchedule("scaled_linear", 0.00085, 0.012, 1000, prediction)

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        if resolution % self.vae_downsample:
            raise ValueError(f"data.resolution={resolution} must be a multiple of {self.vae_downsample} "
                             f"(the {self.name} VAE's downsampling factor)")
        side = resolution // self.vae_downsample
        return (self.latent_channels, side, side)

    def expected_layout(self) -> str:
        """A human-readable description of the folder this family loads, for error messages."""
        folders = [self.denoiser_folder, "vae", *self.text_folders]
        folders += [f.replace("text_encoder", "tokenizer") for f in self.text_folders]
        return (f"a diffusers {self.pipeline_class} folder: model_index.json with _class_name "
                f"'{self.pipeline_class}' and subfolders {', '.join(f + '/' for f in folders)}")


_VP_STEPS = (999, 749, 499, 249)
_FLOW_STEPS = (1000, 750, 500, 250)

_REAL = {
    "sd15": Family("sd15", "sd15", False, "StableDiffusionPipeline", "unet", ("text_encoder",), 4, 8, 0.18215, 0.0,
                   512, _VP_STEPS, "stable-diffusion-v1-5/stable-diffusion-v1-5", "facebook/sam-vit-large", "epsilon"),
    "sdxl": Family("sdxl", "sdxl", False, "StableDiffusionXLPipeline", "unet", ("text_encoder", "text_encoder_2"), 4,
                   8, 0.13025, 0.0, 1024, _VP_STEPS, "stabilityai/stable-diffusion-xl-base-1.0",
                   "facebook/sam-vit-large", "epsilon"),
    "sd3": Family("sd3", "sd3", False, "StableDiffusion3Pipeline", "transformer", ("text_encoder", "text_encoder_2"),
                  16, 8, 1.5305, 0.0609, 1024, _FLOW_STEPS, "stabilityai/stable-diffusion-3-medium-diffusers",
                  "facebook/sam-vit-large", "flow"),
}

# Tiny twins: same kinds and constants, 64 px native, weights built locally (flashdmd/nets/tiny.py).
FAMILIES: dict[str, Family] = dict(_REAL)
for _real in _REAL.values():
    FAMILIES[f"tiny-{_real.name}"] = Family(
        f"tiny-{_real.name}", _real.kind, True, _real.pipeline_class, _real.denoiser_folder, _real.text_folders,
        _real.latent_channels, _real.vae_downsample, _real.scaling_factor, _real.shift_factor, 64,
        _real.student_timesteps, "", "", _real.default_prediction)

KIND_OF_PIPELINE = {f.pipeline_class: f.kind for f in _REAL.values()}


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"unknown model.family {name!r}; known: {', '.join(sorted(FAMILIES))}, gmm2d")
    return FAMILIES[name]
