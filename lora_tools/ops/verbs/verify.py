"""``verify``: sample a model with its settings, and check a fused file against base + runtime LoRAs
(:func:`lora_tools.verify.plan_verify`, :func:`lora_tools.verify.run_verify`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from lora_tools.ops.fields import Seeds, Size
from lora_tools.ops.operation import Operation, OpResult, Options, cli
from lora_tools.ops.verbs._lora import LoraRef, short_form

INPUT_KEYS = ("model", "against", "base", "loras")
OUTPUT_KEYS = ("out",)
REFERENCES = ("config",)


class VerifyOptions(Options):
    """Options of ``verify``; ``out`` is the folder it writes (``report.json``, ``report.md``, ``grid.png``,
    ``images/``)."""

    model: str = Field(json_schema_extra=cli(argument=True))
    preset: str = Field("auto", description="auto: the settings fuse recorded in MODEL (else its file name); or a "
                        "preset name (loratool presets).", json_schema_extra=cli(show_default=True))
    prompts: list[str] = Field(default_factory=lambda: ["a cat", "a lighthouse at dusk"],
                               description="A prompt to render (repeatable).",
                               json_schema_extra=cli("--prompt", metavar="TEXT"))
    seeds: Seeds = Field(default_factory=lambda: [0], description="Seeds, comma separated.",
                         json_schema_extra=cli(kind="seeds", show_default=True))
    size: Size | None = Field(None, description="Image size WxH (default: the model's own, 1024x1024 for an SDXL-sized "
                              "UNet, 64x64 for a test-sized one).", json_schema_extra=cli(kind="size"))
    steps: int | None = Field(None, description="Another step count (refused when it contradicts the model, "
                              "unless --force).")
    force: bool = Field(False, description="Sample with a step count or preset that contradicts the model.")
    out: str | None = Field(None, description="Folder for grid.png, each image, report.json and report.md.")
    against: str | None = Field(None, description="The base MODEL was fused from (faithfulness check).")
    loras: list[LoraRef] = Field(default_factory=list, description="A LoRA fused into MODEL, applied to --against at "
                                 "run time.", json_schema_extra=cli("--lora", metavar="SRC[:STRENGTH]", kind="lora_ref"))
    base: str | None = Field(None, description="The rest of the pipeline for a standalone UNet MODEL.")
    config: str | None = Field(None, description="A diffusers SDXL folder with the tokenizers (else the hub cache of "
                               "the SDXL base).", json_schema_extra=cli(folder=True))
    device: Literal["auto", "cuda", "mps", "cpu"] = Field("auto", json_schema_extra=cli(show_default=True))
    dtype: Literal["auto", "fp16", "bf16", "fp32"] = Field("auto", json_schema_extra=cli(show_default=True))
    show_wrong: bool = Field(False, description="Add a column rendered with wrong settings (leading, CFG 7, 30 steps).")
    workflow: bool = Field(False, description="Also write a ComfyUI API-format workflow.json into --out.")

    @field_validator("loras", mode="before")
    @classmethod
    def _short_form(cls, v: Any) -> Any:
        return short_form(v)


def parse_size(text: str) -> tuple[int, int]:
    """``1024x768`` -> ``(1024, 768)`` (the one rule: :func:`lora_tools.values.size`).

    Raises:
        [`UsageError`]: not ``WIDTHxHEIGHT`` in range.
    """
    from lora_tools import values
    from lora_tools.errors import Hint, UsageError

    try:
        return values.size(text)
    except values.BadValue as e:
        raise UsageError(f"size: {e.message}", hint=Hint("size", "", "WxH")) from None


@dataclass
class VerifyOpPlan:
    options: VerifyOptions
    plan: Any

    @cached_property
    def entry(self) -> dict[str, Any]:
        return OPERATION.entry(self.options)

    def close(self) -> None:
        """Nothing held."""


def plan(o: VerifyOptions, *, overwrite: bool = False, compile: bool = False) -> VerifyOpPlan:
    """Check the arguments and the files (:func:`lora_tools.verify.plan_verify`); load nothing."""
    from lora_tools.errors import Hint, UsageError
    from lora_tools.verify import plan_verify

    if o.workflow and o.out is None:
        raise UsageError("the workflow is written into the output folder.", hint=Hint("out", "", "DIR"))
    vp = plan_verify(Path(o.model), preset=o.preset, prompts=list(o.prompts), seeds=tuple(o.seeds),
                     size=parse_size(o.size) if o.size is not None else None, steps=o.steps, force=o.force,
                     base=Path(o.base) if o.base is not None else None,
                     config=Path(o.config) if o.config is not None else None,
                     against=Path(o.against) if o.against is not None else None,
                     loras=[(x.lora, float(x.strength)) for x in o.loras], device=o.device, dtype=o.dtype,
                     compile=compile, show_wrong=o.show_wrong, workflow=o.workflow,
                     out=Path(o.out) if o.out is not None else None, overwrite=overwrite)
    return VerifyOpPlan(o, vp)


def run(planned: VerifyOpPlan, *, created: str | None = None, progress: Callable[[int], None] | None = None,
        steps: Callable[[str, int, int], None] | None = None) -> OpResult:
    """Render and compare; the report is a :class:`~lora_tools.verify.report.VerifyReport` (``ok``, ``verdict``).
    ``steps(what, step, total)`` is called after each UNet step."""
    from lora_tools.verify import run_verify

    report = run_verify(planned.plan, steps)
    return OpResult([Path(planned.options.out)] if planned.options.out is not None else [], report)


OPERATION = Operation("verify", VerifyOptions, INPUT_KEYS, OUTPUT_KEYS, "folder", plan, run, references=REFERENCES,
                      recipe_required=("out",), summary="sample a model and check it")
