"""What an operation is: :class:`Operation` (one verb, declared once), its options base and its result.

The table of every operation is :data:`lora_tools.ops.registry.OPS`; each verb module in
:mod:`lora_tools.ops.verbs` declares one :class:`Operation`. Imports only pydantic.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from lora_tools.lora.adapter import LoraAdapter

#: What an operation writes: a LoRA file, model files, a JSON report, a report folder, a release folder.
Writes = Literal["lora", "model", "json", "folder", "release"]


class Options(BaseModel):
    """Base of every operation's options model: unknown keys are refused (a recipe typo is an error)."""

    model_config = ConfigDict(extra="forbid")


def cli(*flags: str, argument: bool = False, metavar: str | None = None, kind: str | None = None,
        show_default: bool = False, hidden: bool = False, exists: bool = False, folder: bool | None = None,
        command: bool = True) -> dict[str, Any]:
    """How an option appears on the command line (``Field(json_schema_extra=cli(...))``).

    Args:
        flags: the flags (default ``--name-with-dashes``); extra ones are aliases.
        argument: a positional argument instead of an option.
        metavar: the value's name in ``--help``.
        kind: a value kind of the CLI type table (``lora_ref``, ``weighted_ref``, ``seed_list``...)
            when the Python type alone does not say how the text is read.
        show_default: show the default in ``--help``.
        exists: the path must exist (click checks it).
        folder: ``True``: a folder; ``False``: a file; ``None``: either.
        command: ``False``: a recipe-only option (``publish``'s ``verify`` names jobs of the recipe).
    """
    spec: dict[str, Any] = {"flags": list(flags), "argument": argument, "metavar": metavar, "kind": kind,
                            "show_default": show_default, "hidden": hidden, "exists": exists, "folder": folder,
                            "command": command}
    return {"cli": spec}


def cli_spec(info: Any) -> dict[str, Any]:
    """The :func:`cli` settings of a model field (defaults where it has none)."""
    extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
    return extra.get("cli") or cli()["cli"]


@dataclass
class OpResult:
    """What an operation did: the files it wrote, its report, and the LoRA it made (where there is one).

    Attributes:
        files: every file or folder written, in the order written.
        report: the operation's report (``to_dict()`` gives its JSON), or ``None``.
        adapter: the in-memory LoRA the files hold (LoRA-writing operations), or ``None``.
        extra: further facts a command shows (a fuse's :class:`~lora_tools.ops.fuse.FuseResult`...).
    """

    files: list[Path] = field(default_factory=list)
    report: Any = None
    adapter: LoraAdapter | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Operation:
    """One verb, declared once.

    Attributes:
        name: the verb (``loratool NAME``, a recipe's ``NAME:`` job, the record's ``operation``).
        options_model: its options (pydantic); the CLI and the recipe schema are built from it.
        input_keys: options naming the files it reads (each recorded with its sha256).
        output_keys: the option naming what it writes (``output``; ``verify``: ``out``...).
        references: further options whose value a recipe resolves as an input, a job or a path
            (folders and files the record names but does not hash).
        writes: what it writes (the recipe adapter that decides skip/redo follows from it).
        plan: ``plan(options, *, overwrite=False) -> Planned``: everything checked, nothing written.
        run: ``run(planned, *, created=None, progress=None) -> OpResult``: write the outputs.
        recipe_required: options a recipe must give that the command defaults (a fuse's ``output``).
        outputs: ``outputs(options) -> paths`` when a run writes other paths than its output option's
            value (a fuse's several saves; a dry-run publish nothing).
        summary: one line for listings (and the help of a command generated for it).
        example: a command line for that help (``loratool NAME ...``).
    """

    name: str
    options_model: type[Options]
    input_keys: tuple[str, ...]
    output_keys: tuple[str, ...]
    writes: Writes
    plan: Callable[..., Any]
    run: Callable[..., OpResult]
    references: tuple[str, ...] = ()
    recipe_required: tuple[str, ...] = ()
    outputs: Callable[[Mapping[str, Any]], tuple[str, ...]] | None = None
    summary: str = ""
    example: str = ""

    def __call__(self, options: Options | Mapping[str, Any] | None = None, /, *, overwrite: bool = False,
                 created: str | None = None, progress: Callable[[int], None] | None = None,
                 **fields: Any) -> OpResult:
        """Plan, then run: the library call a command makes (options as a model, a mapping or keywords).

        Example:
            >>> from lora_tools import rescale
            >>> rescale(lora="style.safetensors", strength=0.6, output="style-0.6.safetensors").files
        """
        if options is None:
            options = fields
        elif fields:
            raise TypeError(f"{self.name}: give the options as a model or as keywords, not both")
        opts = options if isinstance(options, Options) else self.options_model.model_validate(dict(options))
        planned = self.plan(opts, overwrite=overwrite)
        try:
            return self.run(planned, created=created, progress=progress)
        finally:
            close = getattr(planned, "close", None)
            if close is not None:
                close()

    def output_paths(self, options: Mapping[str, Any]) -> tuple[str, ...]:
        """What a run with ``options`` (their plain values) writes, computed by the operation alone."""
        if self.outputs is not None:
            return self.outputs(options)
        return (str(options[self.output_keys[0]]),)

    @property
    def path_keys(self) -> tuple[str, ...]:
        """Every option whose value names a file or folder (inputs, references, outputs)."""
        return tuple(dict.fromkeys((*self.input_keys, *self.references, *self.output_keys)))

    def entry(self, options: Options | Mapping[str, Any], *, sha256: Callable[[Path], str] | None = None) -> dict[str, Any]:
        """The record entry of a run with ``options`` (see :func:`lora_tools.provenance.operation_entry`):
        every input and reference named with its option, files pinned by sha256 (over 2 GiB by a
        sampled one, unless the options ask for ``hash_base``). ``sha256``: hashes already at hand."""
        from lora_tools.provenance import operation_entry

        values = options.model_dump() if isinstance(options, BaseModel) else dict(options)
        return operation_entry(self.name, values, (*self.input_keys, *self.references), self.path_keys,
                               self.output_keys, full_hash=True if values.get("hash_base") else None, sha256=sha256)


__all__ = ["Operation", "OpResult", "Options", "cli", "cli_spec", "Writes"]
