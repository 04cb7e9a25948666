"""Adapters of the operations whose output is one LoRA file or one JSON report.

Each runs the operation of :mod:`lora_tools.ops.registry` (the very ``plan``/``run`` its command
calls), so a job's output is the command's output byte for byte. What a job writes carries the
operation's ``loratool`` record with its run entry under ``recipe``
(:func:`lora_tools.provenance.operation_entry`: the kind, every option, each input's name and
sha256, the tool version); a re-run compares that entry with the one the job would write and skips
the output when they agree.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lora_tools.errors import OutputExistsError
from lora_tools.io.remote import as_path, is_url
from lora_tools.ops.registry import Operation
from lora_tools.provenance import LORATOOL_METADATA_KEY, read_record
from lora_tools.recipes.jobs import JobCheck, JobResult, Progress, ResolvedJob, decide, note_changes, record_diff


def compare_entries(outputs: tuple[str, ...], stored: Mapping[str, dict[str, Any] | None | bool],
                    expected: Mapping[str, Any]) -> tuple[str, str]:
    """``run``/``redo``/``skip`` and why. ``stored[path]``: the recorded entry, ``None`` when the output
    exists without one (never replaced: :class:`OutputExistsError`), ``False`` when it is missing."""
    missing: list[str] = []
    differ: list[str] = []
    for out in outputs:
        entry = stored[out]
        if entry is False:
            missing.append(Path(out).name)
        elif entry is None:
            raise OutputExistsError(f"'{out}' already exists and was not written by a loratool recipe: remove it or "
                                    "choose another output name; a recipe only replaces its own outputs.")
        else:
            note_changes(differ, out, record_diff(entry, dict(expected)))
    return decide(len(outputs), missing, differ)


def lora_file_entry(path: Path) -> dict[str, Any] | None | bool:
    """The run entry of a safetensors output (``False``: missing; ``None``: not one of ours)."""
    from lora_tools.errors import LoraToolsError
    from lora_tools.io.safetensors import read_header

    if not path.exists():
        return False
    try:
        record = read_record(read_header(path).metadata)
    except LoraToolsError:
        return None
    entry = (record or {}).get("recipe")
    return entry if isinstance(entry, dict) else None


def json_file_entry(path: Path) -> dict[str, Any] | None | bool:
    """The run entry of a JSON report (``False``: missing; ``None``: not one of ours)."""
    if not path.exists():
        return False
    try:
        entry = json.loads(path.read_text(encoding="utf-8")).get(LORATOOL_METADATA_KEY, {}).get("recipe")
    except (OSError, ValueError, AttributeError):
        return None
    return entry if isinstance(entry, dict) else None


class LoraOpJob:
    """Jobs of an operation writing one file (a LoRA, or a JSON report): plan, compare entries, run."""

    def __init__(self, op: Operation) -> None:
        self.op = op
        self.kind = op.name
        self.stored = json_file_entry if op.writes == "json" else lora_file_entry

    def _plan(self, job: ResolvedJob):
        return self.op.plan(self.op.options_model.model_validate(job.options), overwrite=True)

    def check(self, job: ResolvedJob) -> JobCheck:
        planned = self._plan(job)
        out = job.outputs[0]
        state, reason = compare_entries(job.outputs, {out: self.stored(as_path(out))}, planned.entry)
        return JobCheck(state, reason)  # type: ignore[arg-type]

    def run(self, job: ResolvedJob, progress: Progress | None = None) -> JobResult:
        start = time.perf_counter()
        planned = self._plan(job)
        out = as_path(job.outputs[0])
        state, reason = compare_entries(job.outputs, {job.outputs[0]: self.stored(out)}, planned.entry)
        if state == "skip":
            return JobResult(job.name, "skipped", time.perf_counter() - start, job.outputs, reason)
        if not is_url(out):
            out.parent.mkdir(parents=True, exist_ok=True)
        self.op.run(planned, created=job.created)
        return JobResult(job.name, "done", time.perf_counter() - start, job.outputs, reason if state == "redo" else "")


__all__ = ["LoraOpJob", "compare_entries", "lora_file_entry", "json_file_entry"]
