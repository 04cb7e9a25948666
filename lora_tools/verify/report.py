"""What ``verify`` found: per image timings and faithfulness, the settings run, a verdict; as JSON and Markdown."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["ImageResult", "VerifyReport"]


def _num(x: float | None) -> float | str | None:
    """JSON has no inf/nan: write them as strings."""
    if x is None or math.isfinite(x):
        return x
    return str(x)


@dataclass
class ImageResult:
    """One rendered image: its prompt and seed, timings, and with a reference its distance to it."""

    prompt: str
    seed: int
    seconds: float
    step_seconds: list[float]
    file: str | None = None
    decode_seconds: float | None = None
    psnr_db: float | None = None
    image_psnr_db: float | None = None
    max_abs: float | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("psnr_db", "image_psnr_db", "max_abs"):
            d[k] = _num(d[k])
        return d


@dataclass
class VerifyReport:
    """The result of :func:`lora_tools.verify.run_verify` (``report.json`` holds :meth:`to_dict`)."""

    model: dict[str, Any]
    preset: str | None
    settings: dict[str, Any]
    device: str
    dtype: str
    images: list[ImageResult]
    failures: list[str] = field(default_factory=list)
    verdict: str | None = None
    threshold: dict[str, Any] | None = None
    against: dict[str, Any] | None = None
    compile_seconds: float | None = None
    peak_gpu_memory_bytes: int | None = None
    files: list[str] = field(default_factory=list)
    wrong_settings: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        """No failed check, and a ``"pass"`` verdict where one was asked for."""
        return not self.failures and self.verdict in (None, "pass")

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "preset": self.preset, "settings": self.settings, "device": self.device,
                "dtype": self.dtype, "images": [i.to_dict() for i in self.images], "failures": list(self.failures),
                "verdict": self.verdict, "threshold": self.threshold, "against": self.against,
                "compile_seconds": self.compile_seconds, "peak_gpu_memory_bytes": self.peak_gpu_memory_bytes,
                "files": list(self.files), "wrong_settings": self.wrong_settings}

    def write_json(self, path: Path) -> Path:
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    def markdown(self) -> str:
        """The report for people: what was checked, with which settings, and the verdict first."""
        s = self.settings
        name = Path(str(self.model.get("path", ""))).name
        options = ", ".join(f"{k}={v}" for k, v in (s.get("options") or {}).items())
        lines = [f"# Verification of {name}", ""]
        if self.verdict is not None and self.threshold is not None:
            worst = min((i.psnr_db for i in self.images if i.psnr_db is not None), default=float("nan"))
            against = self.against or {}
            reference = ("its base with the LoRAs applied at run time" if against.get("loras")
                         else Path(str(against.get("base", "the reference"))).name)
            verb = "renders like" if self.verdict == "pass" else "does not render like"
            lines += [f"**Verdict: {self.verdict.upper()}.** The model {verb} {reference}: "
                      f"worst PSNR {worst:.1f} dB on the {self.threshold.get('on', 'final latents')}, "
                      f"threshold {self.threshold.get('psnr_db'):g} dB for {self.threshold.get('dtype', self.dtype)}.",
                      ""]
        lines += ["## Settings", "",
                  f"- Preset: {self.preset or 'the settings recorded in the file'}",
                  f"- Scheduler: {s.get('scheduler')}" + (f" ({options})" if options else ""),
                  f"- Steps: {s.get('steps')} (timesteps {', '.join(str(t) for t in s.get('timesteps') or [])}), "
                  f"guidance scale {s.get('guidance_scale'):g}, prediction type {s.get('prediction_type')}",
                  f"- Ran on {self.device} in {self.dtype}"]
        if self.against is not None:
            loras = ", ".join(f"{Path(str(x['path'])).name} at {x['strength']:g}" for x in self.against.get("loras", []))
            base = Path(str(self.against.get("base"))).name
            lines.append(f"- Compared with: {base} + {loras} (runtime LoRAs)" if loras else f"- Compared with: {base}")
        for failure in self.failures:
            lines.append(f"- failed: {failure}")
        if self.wrong_settings is not None:
            w = self.wrong_settings
            lines.append(f"- wrong settings column (what the model was not made for): {w['scheduler']}, "
                         f"timestep_spacing {w['timestep_spacing']}, {w['steps']} steps, guidance_scale "
                         f"{w['guidance_scale']:g}, seed {w['seed']}")
        lines += ["", "## Images", "", "| prompt | seed | seconds | PSNR latents (dB) | PSNR image (dB) | max abs |",
                  "|---|---|---|---|---|---|"]
        for i in self.images:
            lines.append(f"| {i.prompt} | {i.seed} | {i.seconds:.3f} | {_cell(i.psnr_db)} | {_cell(i.image_psnr_db)} | "
                         f"{_cell(i.max_abs)} |")
        pictures = [f for f in ("grid.png", "comparison.png") if any(str(x).endswith(f) for x in self.files)]
        if pictures:
            lines += ["", *(f"![{p[:-4]}]({p})" for p in pictures)]
        return "\n".join(lines) + "\n"


def _cell(x: float | None) -> str:
    return "" if x is None else f"{x:.2f}" if math.isfinite(x) else str(x)
