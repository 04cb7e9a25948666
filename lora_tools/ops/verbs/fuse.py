"""``fuse``: an acceleration preset and/or LoRAs fused into an SDXL model
(:func:`lora_tools.ops.fuse_plan.plan_fuse`, :func:`lora_tools.ops.fuse.run_fuse`)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator, model_validator

from lora_tools.io.remote import as_path
from lora_tools.ops.fields import Strength
from lora_tools.ops.operation import Operation, OpResult, Options, cli
from lora_tools.ops.verbs._lora import LoraRef, short_form

if TYPE_CHECKING:
    from lora_tools.ops.fuse_plan import FusePlan

INPUT_KEYS = ("base", "loras", "original_unet")
OUTPUT_KEYS = ("output",)
REFERENCES = ("preset_dir",)
SaveKind = Literal["checkpoint", "unet", "diffusers"]
_log = logging.getLogger("lora_tools")


class FuseOptions(Options):
    """Options of ``fuse`` (``loratool fuse``, a recipe's ``fuse:`` job).

    A recipe may still say ``lightning_dir`` (read as ``preset_dir``, with a deprecation note).
    """

    base: str = Field(json_schema_extra=cli(argument=True))
    preset: str | None = Field(None, description="Acceleration preset to fuse in (e.g. lightning-4step; see loratool "
                               "presets).", json_schema_extra=cli(metavar="NAME"))
    lightning: Literal[1, 2, 4, 8] | None = Field(None, description="SDXL-Lightning step count to fuse in: shorthand "
                                                  "for --preset lightning-Nstep.")
    method: Literal["lora", "unet"] = Field("lora", description="lora: fuse the preset's LoRA; unet: add (the preset's "
                                            "UNet - SDXL base UNet), Lightning's best quality.",
                                            json_schema_extra=cli(show_default=True))
    loras: list[LoraRef] = Field(default_factory=list, description="Extra LoRA: local file or "
                                 "owner/repo/file.safetensors on the hub; strength defaults to 1.0. Repeatable.",
                                 json_schema_extra=cli("--lora", metavar="SRC[:STRENGTH]", kind="lora_ref"))
    strength: Strength | None = Field(None, description="Strength of the preset's LoRA/difference (default 1.0; "
                                      "needs --preset or --lightning).", json_schema_extra=cli(kind="preset_strength"))
    saves: list[SaveKind] = Field(default_factory=lambda: list[SaveKind](["checkpoint"]),
                                  description="What to write (repeatable): whole single file, standalone diffusers "
                                  "UNet, diffusers folder. Default: checkpoint.", json_schema_extra=cli("--save"))
    output: str | None = Field(None, description="Output path (default: next to BASE, named after what was done).",
                               json_schema_extra=cli("-o", "--output"))
    dtype: Literal["keep", "fp16", "bf16", "fp32", "fp8"] = Field(
        "keep", description="dtype of float tensors in the outputs (maths is always fp32). fp8: the UNet's linear "
        "weights (plain: conv too) in float8_e4m3fn, the rest kept (single file and UNet outputs; see --fp8).",
        json_schema_extra=cli(show_default=True))
    fp8: Literal["scaled", "plain"] | None = Field(
        None, description="fp8 form with --dtype fp8: scaled (a per-tensor scale_weight, ComfyUI's scaled fp8: "
        "small layers keep their precision; convs stay in their dtype, as ComfyUI scales linear layers only) or plain "
        "(weights cast to e4m3fn, for Forge's and ComfyUI's fp8 weight option). Default: scaled for a single file, "
        "plain when a standalone UNet is written (ComfyUI reads scaled fp8 in single files only).")
    allow_unmatched: bool = Field(False, description="Skip LoRA modules that have no target instead of failing.")
    force: bool = Field(False, description="Fuse even into a model lora_tools already fused a preset into.")
    revision: str | None = Field(None, description="Hub revision (commit, tag or branch) for hub downloads.")
    preset_dir: str | None = Field(None, description="Local folder holding the preset's files, e.g. "
                                   "ByteDance/SDXL-Lightning's (instead of the hub).",
                                   json_schema_extra=cli("--preset-dir", "--lightning-dir", folder=True))
    original_unet: str | None = Field(None, description="The SDXL base UNet (diffusers layout) for --method unet "
                                      "(instead of the hub).", json_schema_extra=cli(folder=False))
    variant: str | None = Field(None, description="Weights variant of a diffusers-folder BASE (e.g. fp16).")
    hash_base: bool = Field(False, description="Record the base's full sha256 even when it is over 2 GiB (one more "
                            "pass over the file).")
    hash_output: bool = Field(False, description="sha256 (and AutoV2) of each output, computed while it is written "
                              "(default: only for outputs up to 2 GiB; about 1 s of CPU per GB).")
    verify_output: bool = Field(False, description="Before renaming each output into place, read it back and check "
                                "its sha256 (one more pass).")
    workflow: bool = Field(False, description="Also write a ComfyUI API-format workflow (NAME-workflow.json) beside "
                           "the checkpoint.")

    @model_validator(mode="before")
    @classmethod
    def _aliases(cls, data: Any) -> Any:
        if isinstance(data, dict) and "lightning_dir" in data:
            data = dict(data)
            old = data.pop("lightning_dir")
            if data.get("preset_dir") is not None and old is not None:
                raise ValueError("give preset_dir or lightning_dir, not both")
            data["preset_dir"] = old
            _log.info("fuse option 'lightning_dir' is deprecated: it is read as 'preset_dir'")
        return data

    @field_validator("loras", mode="before")
    @classmethod
    def _short_form(cls, v: Any) -> Any:
        return short_form(v)

    @model_validator(mode="after")
    def _something(self) -> FuseOptions:
        if self.lightning is None and self.preset is None and not self.loras:
            raise ValueError("nothing to fuse: give preset (or lightning) and/or loras")
        if self.lightning is not None and self.preset is not None:
            raise ValueError("give preset or lightning, not both")
        return self

    @property
    def preset_name(self) -> str | None:
        """The preset, ``lightning: N`` read as ``lightning-Nstep``."""
        return self.preset or (f"lightning-{self.lightning}step" if self.lightning is not None else None)


@dataclass
class FuseOpPlan:
    """A planned fuse: the library's :class:`~lora_tools.ops.fuse_plan.FusePlan` and, with ``workflow``, the
    workflow file to write beside the checkpoint. ``close()`` it."""

    options: FuseOptions
    plan: FusePlan
    workflow: Path | None = None
    checkpoint: Path | None = None

    @cached_property
    def entry(self) -> dict[str, Any]:
        return OPERATION.entry(self.options, sha256=self.plan.sha256_of)  # the LoRAs' hashes, taken while planning

    @property
    def outputs(self) -> list[Path]:
        return [as_path(s.path) for s in self.plan.outputs]

    def record(self, created: str | None = None) -> dict[str, Any]:
        """The record the outputs will hold."""
        from lora_tools.ops.fuse import provenance_record

        return provenance_record(self.plan, created=created, run_entry=self.entry)

    def close(self) -> None:
        self.plan.close()


def plan(o: FuseOptions, *, overwrite: bool = False) -> FuseOpPlan:
    """Everything a fuse needs, checked (:func:`~lora_tools.ops.fuse_plan.plan_fuse`); nothing written."""
    from lora_tools.ops.fuse_plan import plan_fuse

    if o.lightning is not None:  # the shorthand is recorded as the preset it names
        o = o.model_copy(update={"preset": o.preset_name, "lightning": None})
    fp = plan_fuse(
        o.base, o.preset_name, method=o.method, loras=[(x.lora, float(x.strength)) for x in o.loras],
        saves=tuple(o.saves) or ("checkpoint",), output=o.output, dtype=o.dtype, preset_strength=o.strength,
        allow_unmatched=o.allow_unmatched, force=o.force, overwrite=overwrite, revision=o.revision,
        preset_dir=o.preset_dir, original_unet=o.original_unet, variant=o.variant, hash_base=o.hash_base,
        verify_output=o.verify_output, fp8=o.fp8,
    )
    if o.hash_output:
        fp.hash_output = True
    planned = FuseOpPlan(o, fp)
    if o.workflow:
        try:
            planned.workflow, planned.checkpoint = _plan_workflow(fp, overwrite)
        except BaseException:
            fp.close()
            raise
    return planned


def _plan_workflow(fp: FusePlan, overwrite: bool) -> tuple[Path, Path]:
    """(workflow path, checkpoint path), checked before the fuse writes anything."""
    from lora_tools.errors import Hint, UsageError
    from lora_tools.verify.workflow import workflow_file

    ckpt = next((as_path(s.path) for s in fp.outputs if s.kind == "checkpoint"), None)
    if ckpt is None:
        raise UsageError("a workflow loads a single-file checkpoint in ComfyUI",
                         hint=Hint("saves", "to write one", "checkpoint"))
    return workflow_file(ckpt, fp.sampler, overwrite=overwrite), ckpt


def run(planned: FuseOpPlan, *, created: str | None = None, progress: Callable[[int], None] | None = None) -> OpResult:
    """Fuse: stream the base once, write every planned output (then the workflow). ``extra["fuse"]`` is the
    :class:`~lora_tools.ops.fuse.FuseResult` (modules fused, tensors patched, files with their sha256)."""
    from lora_tools.ops.fuse import run_fuse

    result = run_fuse(planned.plan, progress=progress, created=created, run_entry=planned.entry)
    files = [as_path(f.path) for f in result.files]
    if planned.workflow is not None and planned.checkpoint is not None and planned.plan.sampler is not None:
        from lora_tools.verify.workflow import write_workflow

        files.append(Path(write_workflow(planned.workflow, planned.checkpoint.name, planned.plan.sampler)))
    return OpResult(files, None, None, {"fuse": result})


def outputs(options: Mapping[str, Any]) -> tuple[str, ...]:
    """The files (and folder) a fuse with an ``output`` writes, named as the plan names them."""
    from lora_tools.ops.fuse_plan import output_paths

    return tuple(str(p) for _, p in output_paths(options.get("saves") or ["checkpoint"], options["output"]))


OPERATION = Operation("fuse", FuseOptions, INPUT_KEYS, OUTPUT_KEYS, "model", plan, run, references=REFERENCES,
                      recipe_required=("output",), outputs=outputs, summary="fuse a preset and/or LoRAs into a model")
