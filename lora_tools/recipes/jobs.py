"""What every job kind shares: the resolved job, its check and result, and the skip/redo rule.

The adapters (one per kind of output, over the operations of :mod:`lora_tools.ops.registry`) and
``check_job``/``run_job`` are in :mod:`lora_tools.recipes.registry`.

A :class:`ResolvedJob` is plain, picklable data (absolute paths, validated options), so any
executor (this process, a pool, a cluster) can ship it to where it runs; :func:`check_job` and
:func:`run_job` are module-level functions of it alone. Each adapter decides whether an output
is up to date by comparing the ``loratool`` record the job *would* write with the one the file
holds (inputs with sha256, tool version, every option), ``created`` excepted.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from lora_tools.errors import LoraToolsError, OutputExistsError
from lora_tools.io.remote import as_path
from lora_tools.provenance import read_record

State = Literal["run", "redo", "skip", "pending"]
Outcome = Literal["done", "skipped", "failed", "not run"]
Progress = Callable[[int], None]


@dataclass(frozen=True)
class ResolvedJob:
    """A job ready to run: every reference resolved to an absolute path.

    Attributes:
        name: unique job name (after matrix expansion).
        kind: the job kind (``fuse``).
        options: the kind's validated options; inputs are absolute paths.
        outputs: absolute output paths, in the order the kind writes them.
        depends_on: names of the jobs whose outputs this job reads.
        created: the UTC time to record (a recipe's ``created``), or ``None`` for now.
        source: ``recipe.yaml:12:5`` of the job, for messages.
    """

    name: str
    kind: str
    options: dict[str, Any]
    outputs: tuple[str, ...]
    depends_on: tuple[str, ...] = ()
    created: str | None = None
    source: str = ""


@dataclass
class JobCheck:
    """What running a job would do: ``run`` (no output yet), ``redo`` (``reason`` says what differs),
    ``skip`` (up to date) or ``pending`` (an input is another job's output, not made yet)."""

    state: State
    reason: str = ""
    output_bytes: dict[str, int] = field(default_factory=dict)
    peak_bytes: int | None = None


@dataclass
class JobResult:
    """How a job ended: ``done``, ``skipped`` (up to date), ``failed`` (``message``) or ``not run``."""

    name: str
    outcome: Outcome
    seconds: float = 0.0
    outputs: tuple[str, ...] = ()
    message: str = ""


class JobAdapter(Protocol):
    """Runs one kind of job through the library."""

    kind: str

    def check(self, job: ResolvedJob) -> JobCheck:
        """Plan the job (everything checked, nothing written) and compare with existing outputs."""

    def run(self, job: ResolvedJob, progress: Progress | None = None) -> JobResult:
        """Plan, then write the outputs unless they are up to date."""


def strip_created(record: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A record without its timestamp (what up-to-date checks compare)."""
    if record is None:
        return None
    return {k: v for k, v in record.items() if k != "created"}


def record_diff(old: Any, new: Any, path: str = "") -> list[str]:
    """Human lines for what differs between two records (``sources[1].strength: 1.0 -> 0.8``)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for k in sorted(set(old) | set(new), key=str):
            where = f"{path}.{k}" if path else str(k)
            if k not in old:
                out.append(f"{where}: added")
            elif k not in new:
                out.append(f"{where}: removed")
            else:
                out += record_diff(old[k], new[k], where)
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [line for i, (a, b) in enumerate(zip(old, new, strict=True)) for line in record_diff(a, b, f"{path}[{i}]")]
    if old != new:
        def short(v: Any) -> str:
            text = repr(v) if not isinstance(v, str) else v
            return text if len(text) <= 24 else text[:12] + "..."
        return [f"{path}: {short(old)} -> {short(new)}"]
    return []


def existing_record(path: Path) -> tuple[bool, dict[str, Any] | None]:
    """``(exists, record)`` of an output file (record ``None``: not written by loratool)."""
    from lora_tools.io.safetensors import read_header

    if not path.exists():
        return False, None
    try:
        return True, read_record(read_header(path).metadata)
    except LoraToolsError:
        return True, None


def compare_outputs(outputs: tuple[str, ...], expected: Mapping[str, Any]) -> tuple[State, str]:
    """``run``/``redo``/``skip`` and why, for outputs that should hold record ``expected``.

    Raises:
        [`OutputExistsError`]: an output exists but was not written by loratool (never replaced).
    """
    want = strip_created(expected)
    missing: list[str] = []
    differ: list[str] = []
    for out in outputs:
        exists, record = existing_record(as_path(out))
        if not exists:
            missing.append(Path(out).name)
            continue
        if record is None:
            raise OutputExistsError(f"'{out}' already exists and was not written by loratool: remove it or choose "
                                    "another output name; a recipe only replaces its own outputs.")
        note_changes(differ, out, _record_changes(strip_created(record) or {}, want or {}))
    return decide(len(outputs), missing, differ)


def _record_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """What differs, said by the record's own fields first; the run entry (``recipe``: the options as
    given) only when nothing else differs (an option that changes no other field)."""
    rest = record_diff({k: v for k, v in old.items() if k != "recipe"}, {k: v for k, v in new.items() if k != "recipe"})
    return rest or record_diff({"recipe": old.get("recipe")}, {"recipe": new.get("recipe")})


def note_changes(differ: list[str], output: str, changes: list[str]) -> None:
    """Add one line for `output` to `differ` when its record differs (the first three changes)."""
    if changes:
        differ.append(f"{Path(output).name}: " + "; ".join(changes[:3]) + (" ..." if len(changes) > 3 else ""))


def decide(n_outputs: int, missing: list[str], differ: list[str]) -> tuple[State, str]:
    """``run``/``redo``/``skip`` and why, from the outputs that are missing and those whose record differs."""
    if differ:
        return "redo", "; ".join(differ)
    if missing:
        return ("run" if len(missing) == n_outputs else "redo"), "missing " + ", ".join(missing)
    return "skip", "up to date"


__all__ = ["ResolvedJob", "JobCheck", "JobResult", "JobAdapter", "record_diff", "compare_outputs", "decide",
           "note_changes", "strip_created", "existing_record"]
