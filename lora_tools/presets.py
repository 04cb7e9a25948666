"""Acceleration models (SDXL-Lightning) and the sampler settings they need.

One table, :data:`LIGHTNING`, keyed by step count. Each :class:`AccelerationPreset` names the hub
files of one step count and the :class:`SamplerSettings` the model card prescribes. Facts come from
the ``ByteDance/SDXL-Lightning`` model card (see ``docs/domain.md`` sections 1 and 4):

- Diffusers: ``EulerDiscreteScheduler`` with ``timestep_spacing="trailing"``, steps equal to the
  checkpoint's step count, ``guidance_scale=0``; the 1-step model adds ``prediction_type="sample"``.
- ComfyUI: Euler sampler with the ``sgm_uniform`` scheduler, CFG 1.0; 1-step needs x0 sampling.
- LoRAs exist for 2, 4 and 8 steps only; 1 step ships as a UNet (``..._x0``) and checkpoint only.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType

from lora_tools.errors import UsageError

logger = logging.getLogger(__name__)

__all__ = [
    "LIGHTNING",
    "LIGHTNING_REPO",
    "PRESETS",
    "SDXL_BASE_REPO",
    "SDXL_BASE_UNET_FILE",
    "AccelerationPreset",
    "SamplerSettings",
    "get_preset",
    "identify_file",
    "lightning_preset",
]

#: The model every Lightning file was distilled from (and the "B" of an add-difference merge).
SDXL_BASE_REPO = "stabilityai/stable-diffusion-xl-base-1.0"
#: The base UNet inside :data:`SDXL_BASE_REPO`, used by the add-difference "unet" method.
SDXL_BASE_UNET_FILE = "unet/diffusion_pytorch_model.fp16.safetensors"

LIGHTNING_REPO = "ByteDance/SDXL-Lightning"

_PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


def _fmt_float(x: float) -> str:
    """Write a float briefly, keeping one decimal for whole numbers ("1.0", "7.5")."""
    return f"{x:.1f}" if float(x).is_integer() else f"{x:g}"


@dataclass(frozen=True, slots=True)
class SamplerSettings:
    """Sampler settings an acceleration model needs, for diffusers and for ComfyUI.

    Args:
        scheduler (`str`): diffusers scheduler class name, e.g. ``"EulerDiscreteScheduler"``.
        timestep_spacing (`str`): diffusers ``timestep_spacing`` (``"trailing"`` for Lightning).
        steps (`int`): number of inference steps.
        guidance_scale (`float`): diffusers ``guidance_scale`` (``0.0`` for Lightning: CFG off).
        prediction_type (`str`): ``"epsilon"``, or ``"sample"`` for x0 models (Lightning 1-step).
        comfy_sampler (`str`): ComfyUI sampler name (``"euler"``).
        comfy_scheduler (`str`): ComfyUI scheduler name (``"sgm_uniform"``).
        comfy_cfg (`float`): ComfyUI CFG (``1.0``: the uncond pass is skipped).

    Example:
        ```py
        >>> print(lightning_preset(4).sampler.describe())
        EulerDiscreteScheduler, timestep_spacing=trailing, 4 steps, guidance_scale=0 (ComfyUI: euler + ...)
        ```
    """

    scheduler: str
    timestep_spacing: str
    steps: int
    guidance_scale: float
    prediction_type: str
    comfy_sampler: str
    comfy_scheduler: str
    comfy_cfg: float

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise UsageError(f"Invalid sampler settings: steps must be a positive integer, got {self.steps!r}.")
        if self.prediction_type not in _PREDICTION_TYPES:
            raise UsageError(
                f"Invalid sampler settings: prediction_type {self.prediction_type!r} is not one of "
                f"{', '.join(_PREDICTION_TYPES)}."
            )
        for name in ("guidance_scale", "comfy_cfg"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise UsageError(f"Invalid sampler settings: {name} must be a finite number, got {value!r}.")

    @property
    def comfy_model_sampling(self) -> str:
        """ComfyUI ``ModelSamplingDiscrete`` type: ``"x0"`` for sample prediction, else ``"eps"``/``"v_prediction"``."""
        return {"sample": "x0", "epsilon": "eps"}.get(self.prediction_type, self.prediction_type)

    def to_dict(self) -> dict[str, object]:
        """Return the settings as a JSON-ready dict (field name -> value)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> SamplerSettings:
        """Build settings from :meth:`to_dict` output.

        Values may be strings (safetensors ``__metadata__`` only holds strings); they are converted.
        Unknown keys are ignored, so files written by newer versions still load.

        Raises:
            [`UsageError`]: a field is missing or has a value of the wrong kind.
        """
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in d]
        if missing:
            raise UsageError(f"Cannot read sampler settings: missing {', '.join(missing)}.")
        extra = sorted(set(d) - set(names))
        if extra:
            logger.debug("Ignoring unknown sampler setting(s): %s", ", ".join(extra))
        kwargs: dict[str, object] = {}
        for name in names:
            value = d[name]
            try:
                if name == "steps":
                    if isinstance(value, float) and not value.is_integer():
                        raise ValueError(value)
                    kwargs[name] = int(value)  # type: ignore[call-overload]
                elif name in ("guidance_scale", "comfy_cfg"):
                    kwargs[name] = float(value)  # type: ignore[arg-type]
                else:
                    if not isinstance(value, str):
                        raise TypeError(value)
                    kwargs[name] = value
            except (TypeError, ValueError) as e:
                raise UsageError(f"Cannot read sampler settings: {name}={value!r} is not valid.") from e
        return cls(**kwargs)  # type: ignore[arg-type]

    def describe(self) -> str:
        """Return one human line, e.g. for ``loratool`` output and model cards."""
        parts = [self.scheduler, f"timestep_spacing={self.timestep_spacing}"]
        if self.prediction_type != "epsilon":
            parts.append(f"prediction_type={self.prediction_type}")
        parts.append(f"{self.steps} step" + ("" if self.steps == 1 else "s"))
        parts.append(f"guidance_scale={self.guidance_scale:g}")
        comfy = f"ComfyUI: {self.comfy_sampler} + {self.comfy_scheduler}, CFG {_fmt_float(self.comfy_cfg)}"
        if self.comfy_model_sampling != "eps":
            comfy += f", sampling {self.comfy_model_sampling}"
        return f"{', '.join(parts)} ({comfy})"


@dataclass(frozen=True, slots=True)
class AccelerationPreset:
    """One acceleration model: its hub files and the sampler settings it needs.

    Args:
        name (`str`): preset name, e.g. ``"lightning-4step"``.
        family (`str`): model family, e.g. ``"lightning"``.
        steps (`int`): the step count the model was distilled for.
        repo_id (`str`): hub repository holding the files.
        lora_file (`str`, *optional*): the LoRA file; ``None`` where none exists (Lightning 1-step).
        unet_file (`str`): the diffusers UNet-only file.
        checkpoint_file (`str`): the all-in-one (ComfyUI) checkpoint file.
        sampler (`SamplerSettings`): the settings to sample with.
        known_sha256 (`Mapping[str, str]`): file name -> sha256, where known.
    """

    name: str
    family: str
    steps: int
    repo_id: str
    lora_file: str | None
    unet_file: str
    checkpoint_file: str
    sampler: SamplerSettings
    known_sha256: Mapping[str, str] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        # Freeze the mapping and normalise hashes to lower case.
        frozen = MappingProxyType({k: v.lower() for k, v in self.known_sha256.items()})
        object.__setattr__(self, "known_sha256", frozen)

    @property
    def files(self) -> tuple[str, ...]:
        """All file names of this preset (LoRA if any, UNet, checkpoint)."""
        return tuple(f for f in (self.lora_file, self.unet_file, self.checkpoint_file) if f is not None)

    def hub_ref(self, filename: str) -> str:
        """Return ``"owner/repo/filename"``, the form :func:`lora_tools.hub.resolve_source` accepts."""
        return f"{self.repo_id}/{filename}"


def _lightning(steps: int) -> AccelerationPreset:
    x0 = steps == 1
    suffix = "_x0" if x0 else ""
    return AccelerationPreset(
        name=f"lightning-{steps}step",
        family="lightning",
        steps=steps,
        repo_id=LIGHTNING_REPO,
        lora_file=None if x0 else f"sdxl_lightning_{steps}step_lora.safetensors",
        unet_file=f"sdxl_lightning_{steps}step_unet{suffix}.safetensors",
        checkpoint_file=f"sdxl_lightning_{steps}step{suffix}.safetensors",
        sampler=SamplerSettings(
            scheduler="EulerDiscreteScheduler",
            timestep_spacing="trailing",
            steps=steps,
            guidance_scale=0.0,
            prediction_type="sample" if x0 else "epsilon",
            comfy_sampler="euler",
            comfy_scheduler="sgm_uniform",
            comfy_cfg=1.0,
        ),
        known_sha256=_LIGHTNING_SHA256.get(steps, {}),
    )


# sha256 at hub revision c9a24f48e1c025556787b0c58dd67a091ece2e44 (refiners; domain.md 1.2, 1.3).
_LIGHTNING_SHA256: dict[int, dict[str, str]] = {
    1: {
        "sdxl_lightning_1step_unet_x0.safetensors": "14d53ad5b440a37fc0f429d595d96bf144c5dd842aa5747383e6098c9dbfa644",
    },
    4: {
        "sdxl_lightning_4step_lora.safetensors": "bf56cf2657efb15e465d81402ed481d1e11c4677e4bcce1bc11fe71ad8506b79",
        "sdxl_lightning_4step_unet.safetensors": "39a90a8a2a25c1372633c1e8eb1a96f85eab937bcb58cfc6ec9baf66242ec23c",
    },
}

#: SDXL-Lightning presets by step count (1, 2, 4, 8).
LIGHTNING: dict[int, AccelerationPreset] = {n: _lightning(n) for n in (1, 2, 4, 8)}

#: Every preset by name ("lightning-4step", ...).
PRESETS: dict[str, AccelerationPreset] = {p.name: p for p in LIGHTNING.values()}


def _step_list() -> str:
    counts = [str(n) for n in sorted(LIGHTNING)]
    return ", ".join(counts[:-1]) + " or " + counts[-1]


def lightning_preset(steps: int) -> AccelerationPreset:
    """Return the SDXL-Lightning preset for a step count.

    Raises:
        [`UsageError`]: no Lightning model exists for that step count.

    Example:
        ```py
        >>> lightning_preset(4).lora_file
        'sdxl_lightning_4step_lora.safetensors'
        ```
    """
    if not isinstance(steps, bool) and isinstance(steps, int) and steps in LIGHTNING:
        return LIGHTNING[steps]
    raise UsageError(
        f"SDXL-Lightning has no {steps}-step model: choose {_step_list()} steps "
        "(LoRAs exist for 2, 4 and 8; 1 step is a UNet/checkpoint only)."
    )


def get_preset(name: str) -> AccelerationPreset:
    """Return a preset by name (``"lightning-4step"``).

    Raises:
        [`UsageError`]: unknown name; the message lists the valid names.
    """
    key = name.strip().lower()
    if key in PRESETS:
        return PRESETS[key]
    import difflib

    close = difflib.get_close_matches(key, PRESETS, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise UsageError(f"Unknown preset '{name}': choose one of {', '.join(PRESETS)}.{hint}")


def identify_file(filename: str, sha256: str | None = None) -> AccelerationPreset | None:
    """Find the acceleration preset a file belongs to.

    A known sha256 wins; otherwise the file's base name must equal one of a preset's file names
    (case-insensitive). The step count of a Lightning LoRA cannot be read from its keys, so this is
    the only way to know it.

    Args:
        filename (`str`): a path, a hub reference or a bare name; only the base name is used.
        sha256 (`str`, *optional*): the file's sha256 in hex, if computed.

    Returns:
        `AccelerationPreset` or `None` when the file is not recognised.
    """
    if sha256:
        digest = sha256.strip().lower()
        for preset in LIGHTNING.values():
            if digest in preset.known_sha256.values():
                return preset
    base = filename.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1].lower()
    if not base:
        return None
    for preset in LIGHTNING.values():
        for f in preset.files:
            if base == f.lower():
                known = preset.known_sha256.get(f)
                if sha256 and known and known != sha256.strip().lower():
                    logger.debug("%s is named like %s but its sha256 differs from the known one", filename, f)
                return preset
    return None
