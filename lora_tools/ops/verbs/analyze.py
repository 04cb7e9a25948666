"""``analyze``: which LoRAs a model has baked in, and at what strength (:mod:`lora_tools.ops.analyze`)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from lora_tools.ops.operation import Operation, OpResult, Options, cli

INPUT_KEYS = ("model", "base", "loras")
OUTPUT_KEYS = ("output",)
REFERENCES = ("preset_dir",)


class AnalyzeOptions(Options):
    """Options of ``analyze``; ``output`` (recipes) is the JSON report it writes (what ``--json`` prints)."""

    model: str = Field(json_schema_extra=cli(argument=True))
    base: str = Field(description="The model MODEL was made from.")
    loras: list[str] = Field(default_factory=list, description="A candidate LoRA (repeatable; default: the "
                             "acceleration presets' LoRAs available locally).", json_schema_extra=cli("--lora"))
    preset_dir: str | None = Field(None, description="A folder holding downloaded preset LoRA files (looked in "
                                   "before the Hugging Face cache).", json_schema_extra=cli(folder=True))
    output: str | None = Field(None, description="The JSON report to write.", json_schema_extra=cli(command=False))

    @model_validator(mode="after")
    def _some(self) -> AnalyzeOptions:
        if not self.loras and self.preset_dir is None:
            raise ValueError("analyze needs at least one LoRA (loras) or a preset_dir")
        return self


@dataclass
class AnalyzePlan:
    options: AnalyzeOptions

    @cached_property
    def entry(self) -> dict[str, Any]:
        return OPERATION.entry(self.options)

    def close(self) -> None:
        """Nothing held."""


def plan(o: AnalyzeOptions, *, overwrite: bool = False) -> AnalyzePlan:
    """Nothing to check before the models are read (they are opened by ``run``)."""
    return AnalyzePlan(o)


def run(planned: AnalyzePlan, *, created: str | None = None, progress: Callable[[int], None] | None = None) -> OpResult:
    """Fit each LoRA's strength; with ``output``, write the report as JSON with a ``loratool`` record."""
    from contextlib import ExitStack

    from lora_tools.lora.load import load_lora
    from lora_tools.ops.analyze import analyze_model, analyze_presets

    o = planned.options
    if o.loras:
        with ExitStack() as stack:
            cands = [(Path(p).name, stack.enter_context(load_lora(p))) for p in o.loras]
            report = analyze_model(o.model, o.base, cands)
    else:
        report = analyze_presets(o.model, o.base, preset_dir=o.preset_dir)
    files: list[Path] = []
    if o.output is not None:
        from lora_tools.io import atomic
        from lora_tools.provenance import LORATOOL_METADATA_KEY, build_record

        record = build_record("analyze", sources=[{"role": "model", "name": Path(o.model).name},
                                                  {"role": "base", "name": Path(o.base).name}],
                              created=created, recipe=planned.entry)
        out = Path(o.output)
        atomic.write_text(out, json.dumps({**report.to_dict(), LORATOOL_METADATA_KEY: record}, indent=2,
                                          sort_keys=True) + "\n")
        files.append(out)
    return OpResult(files, report)


OPERATION = Operation("analyze", AnalyzeOptions, INPUT_KEYS, OUTPUT_KEYS, "json", plan, run, references=REFERENCES,
                      recipe_required=("output",), summary="find the LoRAs baked into a model")
