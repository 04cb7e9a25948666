"""Recipe planning: no job's output may equal, hold or lie inside an input of any job.

Outputs are checked against each other in :func:`lora_tools.recipes.run.plan_recipe`; here every
output (a file, or a folder for ``verify``/``publish``) is checked against every input that no job
writes (the recipe's inputs and the files it names), after resolving symbolic links and ``..``. A
recipe that would write over, into or around its own inputs is refused before anything runs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lora_tools.errors import RecipeError
from lora_tools.recipes.jobs import ResolvedJob


def input_paths(options: Mapping[str, Any], keys: Iterable[str]) -> list[str]:
    """The paths a job reads: its reference keys and every ``loras`` entry (``str`` or ``{lora: ...}``)."""
    found: list[str] = []
    for key in (*keys, "loras"):
        value = options.get(key)
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, dict):
                item = item.get("lora")
            if isinstance(item, str) and item:
                found.append(item)
    return found


def _relation(output: Path, source: Path) -> str | None:
    if output == source:
        return "is"
    if output in source.parents:
        return "holds"
    if source in output.parents:
        return "lies inside"
    return None


def check_outputs_against_inputs(jobs: Sequence[ResolvedJob], references: Mapping[str, Iterable[str]]) -> None:
    """Raise :class:`RecipeError` (at the job writing it) when an output equals, holds or lies inside
    an input of any job that no job of the recipe writes.

    Args:
        jobs: the resolved jobs (their options hold absolute paths).
        references: job kind -> the option keys that name inputs (besides ``loras``).
    """
    by_name = {j.name: j for j in jobs}
    sources: dict[Path, str] = {}
    for job in jobs:
        made = {Path(o).resolve() for d in job.depends_on if d in by_name for o in by_name[d].outputs}
        for p in input_paths(job.options, references.get(job.kind, ())):
            resolved = Path(p).expanduser().resolve()
            if resolved not in made:  # another job's output, read after it is written: not an input to protect
                sources.setdefault(resolved, job.name)
    for job in jobs:
        for o in job.outputs:
            out = Path(o).resolve()
            for source, reader in sources.items():
                relation = _relation(out, source)
                if relation is not None:
                    whose = "its own input" if reader == job.name else f"an input of job '{reader}'"
                    raise RecipeError(f"job '{job.name}': the output '{o}' {relation} '{source}', {whose}: "
                                      "choose another output name (a recipe never writes over, into or around "
                                      "its inputs)", location=job.source)


__all__ = ["check_outputs_against_inputs", "input_paths"]
