"""The sampler settings an acceleration model needs, for diffusers and for ComfyUI."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields

from lora_tools.errors import UsageError

logger = logging.getLogger(__name__)

__all__ = ["SCHEDULER_CLASSES", "SamplerSettings"]

_PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")

#: diffusers scheduler classes a preset may name (the ones the model cards prescribe).
SCHEDULER_CLASSES = ("EulerDiscreteScheduler", "DDIMScheduler", "LCMScheduler", "TCDScheduler")

#: The fields every record since the first release carries, in their order.
_CORE = ("scheduler", "timestep_spacing", "steps", "guidance_scale", "prediction_type",
         "comfy_sampler", "comfy_scheduler", "comfy_cfg")

#: What an old record that lacks a field meant: before the registry every record was Lightning's
#: Euler sampler (the scheduler built was always ``EulerDiscreteScheduler``).
_LEGACY_DEFAULTS: dict[str, object] = {
    "scheduler": "EulerDiscreteScheduler", "timestep_spacing": "trailing", "guidance_scale": 0.0,
    "prediction_type": "epsilon", "comfy_sampler": "euler", "comfy_scheduler": "sgm_uniform", "comfy_cfg": 1.0,
}

_FLOATS = ("guidance_scale", "comfy_cfg", "eta", "lora_strength")
_PAIRS = ("steps_range", "guidance_range", "strength_range")


def _fmt_float(x: float) -> str:
    """Write a float briefly, keeping one decimal for whole numbers ("1.0", "7.5")."""
    return f"{x:.1f}" if float(x).is_integer() else f"{x:g}"


def _finite(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UsageError(f"Invalid sampler settings: {name} must be a finite number, got {value!r}.")


@dataclass(frozen=True, slots=True)
class SamplerSettings:
    """Sampler settings an acceleration model needs, for diffusers and for ComfyUI.

    Args:
        scheduler (`str`): diffusers scheduler class name, one of :data:`SCHEDULER_CLASSES`.
        timestep_spacing (`str`, *optional*): diffusers ``timestep_spacing`` (``"trailing"``), or
            ``None`` to keep the scheduler's own (LCM, TCD).
        steps (`int`): number of inference steps.
        guidance_scale (`float`): diffusers ``guidance_scale`` (``0.0``: CFG off).
        prediction_type (`str`): ``"epsilon"``, or ``"sample"`` for x0 models (Lightning 1-step).
        comfy_sampler (`str`): ComfyUI sampler name (``"euler"``).
        comfy_scheduler (`str`): ComfyUI scheduler name (``"sgm_uniform"``).
        comfy_cfg (`float`): ComfyUI CFG (``1.0``: the uncond pass is skipped).
        timesteps (`tuple[int, ...]`, *optional*): explicit timesteps passed to the pipeline
            (DMD2 ``(999, 749, 499, 249)``); ``len(timesteps) == steps``.
        eta (`float`, *optional*): the scheduler's stochasticity passed to the pipeline (TCD's ``eta``).
        steps_range (`tuple[int, int]`, *optional*): the step counts the model card allows.
        guidance_range (`tuple[float, float]`, *optional*): the guidance scales the card allows.
        lora_strength (`float`): recommended LoRA strength (``1.0``).
        strength_range (`tuple[float, float]`, *optional*): strengths advised on fine-tuned checkpoints.
        comfy_sampling (`str`, *optional*): ComfyUI ``ModelSamplingDiscrete`` type when it is not the
            one the prediction type implies (``"lcm"``).
        comfy_node (`str`, *optional*): the custom ComfyUI node needed where core has none.

    Example:
        ```py
        >>> print(lightning_preset(4).sampler.describe())
        EulerDiscreteScheduler, timestep_spacing=trailing, 4 steps, guidance_scale=0 (ComfyUI: euler + ...)
        ```
    """

    scheduler: str
    timestep_spacing: str | None
    steps: int
    guidance_scale: float
    prediction_type: str
    comfy_sampler: str
    comfy_scheduler: str
    comfy_cfg: float
    timesteps: tuple[int, ...] | None = None
    eta: float | None = None
    steps_range: tuple[int, int] | None = None
    guidance_range: tuple[float, float] | None = None
    lora_strength: float = 1.0
    strength_range: tuple[float, float] | None = None
    comfy_sampling: str | None = None
    comfy_node: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise UsageError(f"Invalid sampler settings: steps must be a positive integer, got {self.steps!r}.")
        if self.prediction_type not in _PREDICTION_TYPES:
            raise UsageError(
                f"Invalid sampler settings: prediction_type {self.prediction_type!r} is not one of "
                f"{', '.join(_PREDICTION_TYPES)}."
            )
        if self.scheduler not in SCHEDULER_CLASSES:
            raise UsageError(f"Invalid sampler settings: scheduler {self.scheduler!r} is not one of "
                             f"{', '.join(SCHEDULER_CLASSES)}.")
        for name in _FLOATS:
            value = getattr(self, name)
            if value is not None:
                _finite(name, value)
        if self.timesteps is not None:
            ts = tuple(int(t) for t in self.timesteps)
            if len(ts) != self.steps or any(not 0 <= t < 1000 for t in ts) or list(ts) != sorted(ts, reverse=True):
                raise UsageError(f"Invalid sampler settings: timesteps {list(ts)} must be {self.steps} falling "
                                 "values in 0..999.")
            object.__setattr__(self, "timesteps", ts)
        for name in _PAIRS:
            pair = getattr(self, name)
            if pair is not None:
                lo, hi = pair
                if lo > hi:
                    raise UsageError(f"Invalid sampler settings: {name} {lo}..{hi} is empty.")
                object.__setattr__(self, name, (lo, hi))

    # ------------------------------------------------------------------ ComfyUI

    @property
    def comfy_model_sampling(self) -> str:
        """ComfyUI ``ModelSamplingDiscrete`` type: ``"x0"`` for sample prediction, else ``"eps"``/``"v_prediction"``
        (or the row's own, ``"lcm"``)."""
        if self.comfy_sampling:
            return self.comfy_sampling
        return {"sample": "x0", "epsilon": "eps"}.get(self.prediction_type, self.prediction_type)

    # ------------------------------------------------------------------ diffusers

    def scheduler_options(self) -> dict[str, object]:
        """The options this row sets on the scheduler's config (over the base model's own)."""
        options: dict[str, object] = {"prediction_type": self.prediction_type}
        if self.timestep_spacing is not None:
            options["timestep_spacing"] = self.timestep_spacing
        return options

    def call_kwargs(self) -> dict[str, object]:
        """Keyword arguments of the diffusers pipeline call: steps or explicit timesteps, guidance, eta."""
        kwargs: dict[str, object] = {"guidance_scale": float(self.guidance_scale)}
        if self.timesteps is not None:
            kwargs["timesteps"] = list(self.timesteps)
        else:
            kwargs["num_inference_steps"] = self.steps
        if self.eta is not None:
            kwargs["eta"] = float(self.eta)
        return kwargs

    # ------------------------------------------------------------------ records

    def to_dict(self) -> dict[str, object]:
        """Return the settings as a JSON-ready dict: the core fields always, the others where set."""
        out: dict[str, object] = {name: getattr(self, name) for name in _CORE}
        for f in fields(self):
            if f.name in _CORE:
                continue
            value = getattr(self, f.name)
            if value == f.default:
                continue
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> SamplerSettings:
        """Build settings from :meth:`to_dict` output, or from an older record.

        Values may be strings (safetensors ``__metadata__`` only holds strings); they are converted.
        Unknown keys are ignored, so files written by newer versions still load. A record written
        before the registry (no ``scheduler`` or ComfyUI fields) meant Lightning's Euler sampler.

        Raises:
            [`UsageError`]: ``steps`` is missing, or a field has a value of the wrong kind.
        """
        if "steps" not in d:
            raise UsageError("Cannot read sampler settings: missing steps.")
        names = [f.name for f in fields(cls)]
        extra = sorted(set(d) - set(names))
        if extra:
            logger.debug("Ignoring unknown sampler setting(s): %s", ", ".join(extra))
        kwargs: dict[str, object] = {}
        for name in names:
            if name not in d:
                if name in _LEGACY_DEFAULTS:
                    kwargs[name] = _LEGACY_DEFAULTS[name]
                continue
            try:
                kwargs[name] = _read_field(name, d[name])
            except (TypeError, ValueError) as e:
                raise UsageError(f"Cannot read sampler settings: {name}={d[name]!r} is not valid.") from e
        return cls(**kwargs)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ people

    def describe(self) -> str:
        """Return one human line, e.g. for ``loratool`` output and model cards."""
        parts = [self.scheduler]
        if self.timestep_spacing is not None:
            parts.append(f"timestep_spacing={self.timestep_spacing}")
        if self.prediction_type != "epsilon":
            parts.append(f"prediction_type={self.prediction_type}")
        if self.timesteps is not None:
            parts.append("timesteps=[" + ", ".join(str(t) for t in self.timesteps) + "]")
        if self.eta is not None:
            parts.append(f"eta={self.eta:g}")
        steps = f"{self.steps} step" + ("" if self.steps == 1 else "s")
        if self.steps_range is not None:
            steps += f" ({self.steps_range[0]}-{self.steps_range[1]})"
        parts.append(steps)
        guidance = f"guidance_scale={self.guidance_scale:g}"
        if self.guidance_range is not None:
            guidance += f" ({self.guidance_range[0]:g}-{self.guidance_range[1]:g})"
        parts.append(guidance)
        if self.lora_strength != 1.0 or self.strength_range is not None:
            strength = f"LoRA strength {self.lora_strength:g}"
            if self.strength_range is not None:
                strength += f" ({self.strength_range[0]:g}-{self.strength_range[1]:g} on fine-tunes)"
            parts.append(strength)
        comfy = f"ComfyUI: {self.comfy_sampler} + {self.comfy_scheduler}, CFG {_fmt_float(self.comfy_cfg)}"
        if self.comfy_model_sampling != "eps":
            comfy += f", sampling {self.comfy_model_sampling}"
        if self.comfy_node:
            comfy += f", needs {self.comfy_node}"
        return f"{', '.join(parts)} ({comfy})"


def _read_field(name: str, value: object) -> object:
    """One field of a record (possibly a string from safetensors metadata) as its Python value."""
    if isinstance(value, str) and name in ("timesteps", *_PAIRS):
        value = json.loads(value)
    if isinstance(value, str) and value in ("None", "null") and name != "scheduler":
        return None
    if value is None:
        if name in ("timestep_spacing", "timesteps", "eta", "comfy_sampling", "comfy_node", *_PAIRS):
            return None
        raise TypeError(value)
    if name == "steps":
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return int(value)  # type: ignore[call-overload]
    if name in _FLOATS:
        return float(value)  # type: ignore[arg-type]
    if name == "timesteps":
        if not isinstance(value, (list, tuple)):
            raise TypeError(value)
        return tuple(int(t) for t in value)
    if name in _PAIRS:
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            raise TypeError(value)
        cast = int if name == "steps_range" else float
        return (cast(value[0]), cast(value[1]))
    if not isinstance(value, str):
        raise TypeError(value)
    return value
