"""Adapters of the LoRA-op job kinds: ``rescale``, ``resize``, ``merge``, ``convert``, ``extract``, ``analyze``.

Each calls the same library function as its command (:mod:`lora_tools.ops`), so a job's output is
the command's output tensor for tensor. What a job writes carries the op's own ``loratool`` record
plus a ``recipe`` entry (:func:`job_entry`: the kind, every option, each input's name and sha256,
the tool version); a re-run compares that entry with the one the job would write and skips the
output when they agree. The entry names files, never absolute paths, so a file is the same bytes
whichever folder or executor made it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import json
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Mapping

from lora_tools.errors import OutputExistsError
from lora_tools.provenance import LORATOOL_METADATA_KEY, read_record
from lora_tools.recipes.jobs import JobCheck, JobResult, Progress, ResolvedJob, decide, note_changes, record_diff

#: Option keys of each kind that name input files (hashed into the job's entry).
INPUT_KEYS: dict[str, tuple[str, ...]] = {
    "rescale": ("lora",), "resize": ("lora",), "convert": ("lora",), "merge": ("loras",),
    "extract": ("tuned", "original"), "analyze": ("model", "base", "loras"),
    "verify": ("model", "against", "base", "loras"), "publish": ("path",),
}


def _paths_of(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [value["lora"]] if "lora" in value else []
    if isinstance(value, list):
        return [p for v in value for p in _paths_of(v)]
    return []


def _named(value: Any) -> Any:
    """An option value with absolute paths replaced by their file names."""
    if isinstance(value, str) and Path(value).is_absolute():
        return Path(value).name
    if isinstance(value, dict):
        return {k: _named(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_named(v) for v in value]
    return value


def job_entry(job: ResolvedJob) -> dict[str, Any]:
    """The ``recipe`` entry a job records: kind, options (paths as file names), inputs with sha256, version."""
    from lora_tools import __version__
    from lora_tools.io.hashing import sha256_file

    inputs = []
    for key in INPUT_KEYS.get(job.kind, ()):
        for p in _paths_of(job.options.get(key)):
            path = Path(p)
            entry: dict[str, Any] = {"option": key, "name": path.name}
            if path.is_file():
                entry["sha256"] = sha256_file(path)
            inputs.append(entry)
    return {"kind": job.kind, "version": __version__, "options": _named(job.options), "inputs": inputs}


def compare_entries(outputs: tuple[str, ...], stored: Mapping[str, "dict[str, Any] | None | bool"],
                    expected: Mapping[str, Any]) -> tuple[str, str]:
    """``run``/``redo``/``skip`` and why. ``stored[path]``: the recorded entry, ``None`` when the output
    exists without one (never replaced: :class:`OutputExistsError`), ``False`` when it is missing."""
    missing, differ = [], []
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


def _options_model(kind: str) -> Any:
    """The recipe schema model of a LoRA-op kind (the options its command takes, by the same names)."""
    from lora_tools.recipes import schema

    return {"rescale": schema.RescaleOptions, "resize": schema.ResizeOptions, "merge": schema.MergeOptions,
            "convert": schema.ConvertOptions, "extract": schema.ExtractOptions}[kind]


def command_record(kind: str, result: Any, options: Mapping[str, Any]) -> dict[str, Any]:
    """The ``loratool`` record a plain command writes: the operation's own record (from
    ``result.metadata``) with the ``recipe`` entry of the equivalent recipe job.

    The entry is the one :class:`LoraOpJob` writes for the same options, so ``loratool recipe show``
    can rebuild the file and ``loratool run`` of that recipe writes the very same bytes.

    Args:
        kind: ``rescale``, ``resize``, ``merge``, ``convert`` or ``extract``.
        result: the operation's result LoRA (its metadata holds the operation's record).
        options: the command's options under the job's option names (paths as the caller gave them).

    Raises:
        [`UsageError`]: an option the recipe schema refuses.

    Example:
        >>> record = command_record("rescale", adapter, {"lora": "style.safetensors", "strength": 0.5,
        ...                                              "output": "half.safetensors"})
    """
    from pydantic import ValidationError

    from lora_tools.errors import UsageError

    try:
        opts = _options_model(kind)(**options).model_dump()
    except ValidationError as e:
        raise UsageError(f"{kind}: {e.errors(include_url=False)[0]['msg']}") from None
    absolute = lambda p: str(Path(p).expanduser().resolve())  # noqa: E731  (as a recipe resolves paths)
    for key in (*INPUT_KEYS[kind], "output"):
        value = opts.get(key)
        if isinstance(value, str):
            opts[key] = absolute(value)
        elif isinstance(value, list):
            for item in value:
                item["lora"] = absolute(item["lora"])
    job = ResolvedJob(kind, kind, opts, (opts["output"],))
    return stamped(read_record(result.metadata), job_entry(job), None)


def lora_file_entry(path: Path) -> "dict[str, Any] | None | bool":
    """The ``recipe`` entry of a safetensors output (``False``: missing; ``None``: not a recipe's)."""
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


def stamped(record: Mapping[str, Any] | None, entry: Mapping[str, Any], created: str | None) -> dict[str, Any]:
    """The op's record with the job's ``recipe`` entry (and the recipe's ``created``, if it has one)."""
    out = dict(record or {})
    out["recipe"] = dict(entry)
    if created is not None:
        out["created"] = created
    return out


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temp sibling, then rename it over ``path`` (a killed job leaves no half file)."""
    import os

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class LoraOpJob(ABC):
    """Base of the adapters whose output is one LoRA file: check, compute, write (atomically)."""

    kind = ""

    def format(self, o: Mapping[str, Any]) -> str | None:
        return None

    def validate(self, o: Mapping[str, Any]) -> None:
        """Cheap checks of the options (what the command checks before any maths)."""

    @abstractmethod
    def compute(self, o: Mapping[str, Any], stack: ExitStack) -> Any:
        """The in-memory result LoRA (its metadata holds the op's record)."""

    def _plan(self, job: ResolvedJob):  # type: ignore[no-untyped-def]
        from lora_tools.ops.lora_write import plan_output

        o = job.options
        inputs = [p for k in INPUT_KEYS[self.kind] for p in _paths_of(o.get(k))]
        self.validate(o)
        return plan_output(o["output"], inputs, format=self.format(o), dtype=o.get("dtype", "keep"), overwrite=True)

    def check(self, job: ResolvedJob) -> JobCheck:
        self._plan(job)
        out = job.outputs[0]
        state, reason = compare_entries(job.outputs, {out: lora_file_entry(Path(out))}, job_entry(job))
        return JobCheck(state, reason)  # type: ignore[arg-type]

    def run(self, job: ResolvedJob, progress: Progress | None = None) -> JobResult:
        from lora_tools.lora.save import plan_save, write_plan
        from lora_tools.provenance import with_record

        start = time.perf_counter()
        out = self._plan(job)
        entry = job_entry(job)
        state, reason = compare_entries(job.outputs, {str(out.path): lora_file_entry(out.path)}, entry)
        if state == "skip":
            return JobResult(job.name, "skipped", time.perf_counter() - start, job.outputs, reason)
        with ExitStack() as stack:
            result = self.compute(job.options, stack)
            saved = plan_save(result, format=out.format, dtype=out.dtype)
            record = stamped(read_record(result.metadata), entry, job.created)
            out.path.parent.mkdir(parents=True, exist_ok=True)
            write_plan(saved, out.path, metadata=with_record(saved.metadata, record), overwrite=True)
        return JobResult(job.name, "done", time.perf_counter() - start, job.outputs, reason if state == "redo" else "")


def _rule(o: Mapping[str, Any], keys: tuple[str, ...]):  # type: ignore[no-untyped-def]
    from lora_tools.lora.lowrank import RankRule

    return RankRule(**{k: o.get(k) for k in keys})


def _conv_rule(o: Mapping[str, Any]):  # type: ignore[no-untyped-def]
    from lora_tools.lora.lowrank import RankRule

    return RankRule(rank=o["conv_rank"]) if o.get("conv_rank") is not None else None


def _components(text: str | None) -> list[str] | None:
    return [c.strip() for c in text.split(",") if c.strip()] if text else None


class RescaleJob(LoraOpJob):
    """``rescale`` jobs: :func:`lora_tools.ops.rescale.rescale_lora` (``loratool rescale``)."""

    kind = "rescale"

    def validate(self, o: Mapping[str, Any]) -> None:
        from lora_tools.layouts.blocks import parse_block_weights

        if o.get("blocks") is not None:
            parse_block_weights(o["blocks"])

    def compute(self, o: Mapping[str, Any], stack: ExitStack) -> Any:
        from lora_tools.layouts.blocks import parse_block_weights
        from lora_tools.lora.load import load_lora
        from lora_tools.ops.rescale import rescale_lora

        adapter = stack.enter_context(load_lora(o["lora"]))
        blocks = parse_block_weights(o["blocks"]) if o.get("blocks") is not None else None
        return rescale_lora(adapter, float(o["strength"]), blocks=blocks, components=_components(o.get("components")))[0]


class ResizeJob(LoraOpJob):
    """``resize`` jobs: :func:`lora_tools.ops.resize.resize_lora` (``loratool resize``)."""

    kind = "resize"

    def validate(self, o: Mapping[str, Any]) -> None:
        _rule(o, ("rank", "energy", "sv_ratio", "sv_fro"))
        _conv_rule(o)

    def compute(self, o: Mapping[str, Any], stack: ExitStack) -> Any:
        from lora_tools.lora.load import load_lora
        from lora_tools.ops.resize import resize_lora

        adapter = stack.enter_context(load_lora(o["lora"]))
        return resize_lora(adapter, _rule(o, ("rank", "energy", "sv_ratio", "sv_fro")), conv_rule=_conv_rule(o))[0]


class MergeJob(LoraOpJob):
    """``merge`` jobs: :func:`lora_tools.ops.merge.merge_loras` (``loratool merge``)."""

    kind = "merge"

    def validate(self, o: Mapping[str, Any]) -> None:
        if o.get("rank") is not None or o.get("energy") is not None:
            _rule(o, ("rank", "energy"))

    def compute(self, o: Mapping[str, Any], stack: ExitStack) -> Any:
        from lora_tools.lora.load import load_lora
        from lora_tools.ops.merge import WeightedLora, merge_loras

        rule = _rule(o, ("rank", "energy")) if (o.get("rank") is not None or o.get("energy") is not None) else None
        inputs = [WeightedLora(stack.enter_context(load_lora(x["lora"])), float(x["weight"]), Path(x["lora"]).name)
                  for x in o["loras"]]
        return merge_loras(inputs, method=o.get("method", "concat"), rule=rule)[0]


class ConvertJob(LoraOpJob):
    """``convert`` jobs: :func:`lora_tools.ops.convert.convert_lora` (``loratool convert``)."""

    kind = "convert"

    def format(self, o: Mapping[str, Any]) -> str | None:
        return str(o["to"])

    def compute(self, o: Mapping[str, Any], stack: ExitStack) -> Any:
        from lora_tools.lora.load import load_lora
        from lora_tools.ops.convert import convert_lora

        return convert_lora(stack.enter_context(load_lora(o["lora"])), o["to"])[0]


class ExtractJob(LoraOpJob):
    """``extract`` jobs: :func:`lora_tools.ops.extract.extract_lora` (``loratool extract``)."""

    kind = "extract"

    def format(self, o: Mapping[str, Any]) -> str | None:
        return str(o.get("format", "kohya-diffusers"))

    def validate(self, o: Mapping[str, Any]) -> None:
        _rule(o, ("rank", "energy"))
        _conv_rule(o)

    def compute(self, o: Mapping[str, Any], stack: ExitStack) -> Any:
        from lora_tools.ops.extract import extract_lora

        return extract_lora(o["tuned"], o["original"], _rule(o, ("rank", "energy")),
                            components=_components(o.get("components")) or ["unet"], conv_rule=_conv_rule(o)).adapter


class AnalyzeJob:
    """``analyze`` jobs: :func:`lora_tools.ops.analyze.analyze_model`; writes its report as JSON
    (what ``loratool analyze --json`` prints) with a ``loratool`` record."""

    kind = "analyze"

    @staticmethod
    def stored(path: Path) -> "dict[str, Any] | None | bool":
        if not path.exists():
            return False
        try:
            entry = json.loads(path.read_text(encoding="utf-8")).get(LORATOOL_METADATA_KEY, {}).get("recipe")
        except (OSError, ValueError, AttributeError):
            return None
        return entry if isinstance(entry, dict) else None

    def check(self, job: ResolvedJob) -> JobCheck:
        out = job.outputs[0]
        state, reason = compare_entries(job.outputs, {out: self.stored(Path(out))}, job_entry(job))
        return JobCheck(state, reason)  # type: ignore[arg-type]

    def run(self, job: ResolvedJob, progress: Progress | None = None) -> JobResult:
        from lora_tools.lora.load import load_lora
        from lora_tools.ops.analyze import analyze_model
        from lora_tools.provenance import build_record

        start = time.perf_counter()
        o, entry = job.options, job_entry(job)
        out = Path(job.outputs[0])
        state, reason = compare_entries(job.outputs, {str(out): self.stored(out)}, entry)
        if state == "skip":
            return JobResult(job.name, "skipped", time.perf_counter() - start, job.outputs, reason)
        with ExitStack() as stack:
            cands = [(Path(p).name, stack.enter_context(load_lora(p))) for p in o["loras"]]
            report = analyze_model(o["model"], o["base"], cands)
        record = build_record("analyze", sources=[{"role": "model", "name": Path(o["model"]).name},
                                                  {"role": "base", "name": Path(o["base"]).name}],
                              created=job.created, recipe=entry)
        write_text_atomic(out, json.dumps({**report.to_dict(), LORATOOL_METADATA_KEY: record}, indent=2, sort_keys=True)
                          + "\n")
        return JobResult(job.name, "done", time.perf_counter() - start, job.outputs, reason if state == "redo" else "")


__all__ = ["command_record", "LoraOpJob", "RescaleJob", "ResizeJob", "MergeJob", "ConvertJob", "ExtractJob", "AnalyzeJob", "job_entry",
           "compare_entries", "stamped", "INPUT_KEYS"]
