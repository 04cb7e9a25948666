"""Matrix expansion and ``${name}`` templating of a recipe's jobs.

``matrix: {base: [a, b], steps: [2, 4, 8]}`` turns every job that mentions ``${base}`` and/or
``${steps}`` into one job per combination of the values it mentions (a job that mentions neither
runs once). ``${name}`` is replaced in every string of the job; a string that is exactly
``${name}`` takes the value with its type (``lightning: ${steps}`` is the number 4). ``vars:``
gives names with one value (``--set`` changes them).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from lora_tools.errors import RecipeError
from lora_tools.recipes.loader import Marks
from lora_tools.recipes.schema import JOB_KINDS, NAME_RE, dotted

_REF = re.compile(r"\$\{([^}]*)\}")


@dataclass(frozen=True)
class ExpandedJob:
    """One job after expansion: where it came from (``index`` in ``jobs``), its matrix values, its
    fully templated options (plain values, not yet validated) and its name."""

    index: int
    name: str
    values: dict[str, Any]
    raw: dict[str, Any]


def _strings(value: Any, path: tuple[Any, ...]) -> Iterator[tuple[tuple[Any, ...], str]]:
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(v, path + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _strings(v, path + (i,))


def _name_part(value: Any) -> str:
    """A matrix value as part of a generated job name (characters names cannot hold become '_')."""
    return re.sub(r"[^A-Za-z0-9_.+=,-]", "_", str(value))


def substitute(value: Any, names: Mapping[str, Any]) -> Any:
    """``value`` with every ``${name}`` replaced (names must all be defined)."""
    if isinstance(value, str):
        whole = _REF.fullmatch(value)
        if whole:
            return names[whole.group(1).strip()]
        return _REF.sub(lambda m: str(names[m.group(1).strip()]), value)
    if isinstance(value, dict):
        return {k: substitute(v, names) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute(v, names) for v in value]
    return value


def check_matrix(matrix: Mapping[str, list[Any]], raw: Any, marks: Marks) -> None:
    """Refuse an empty matrix and empty or clashing variable lists."""
    if isinstance(raw, dict) and "matrix" in raw and not matrix:
        raise RecipeError("matrix: empty: give at least one variable with a list of values, or drop 'matrix'",
                          location=marks.at(("matrix",)))
    for name, values in matrix.items():
        if not NAME_RE.fullmatch(name) or "." in name:
            raise RecipeError(f"matrix.{name}: not a valid variable name (letters, digits, '_', '-')",
                              location=marks.at(("matrix", name), key=True))
        if not values:
            raise RecipeError(f"matrix.{name}: empty list: a matrix variable needs at least one value",
                              location=marks.at(("matrix", name)))
        if len(set(map(str, values))) != len(values):
            raise RecipeError(f"matrix.{name}: values repeat", location=marks.at(("matrix", name)))


def expand_jobs(jobs: list[dict[str, Any]], matrix: Mapping[str, list[Any]], variables: Mapping[str, Any],
                marks: Marks) -> list[ExpandedJob]:
    """Every job of the recipe times the matrix values it mentions, templated and named.

    Raises:
        [`RecipeError`]: an undefined ``${name}``, a bad or repeated job name.
    """
    clash = set(matrix) & set(variables)
    if clash:
        name = sorted(clash)[0]
        raise RecipeError(f"vars.{name}: also a matrix variable", location=marks.at(("vars", name), key=True))
    defined = {**variables, **{k: v[0] for k, v in matrix.items()}}
    out: list[ExpandedJob] = []
    seen: dict[str, int] = {}
    for i, job in enumerate(jobs):
        used: list[str] = []
        for path, text in _strings(job, ("jobs", i)):
            for m in _REF.finditer(text):
                ref = m.group(1).strip()
                if ref not in defined:
                    known = ", ".join(sorted(defined)) or "none"
                    raise RecipeError(f"{dotted(path)}: undefined ${{{ref}}} (defined: {known})", location=marks.at(path))
                if ref in matrix and ref not in used:
                    used.append(ref)
        axes = [k for k in matrix if k in used]
        kind = next((k for k in JOB_KINDS if k in job), "job")
        for combo in itertools.product(*(matrix[k] for k in axes)):
            values = dict(zip(axes, combo, strict=True))
            names = {**variables, **values}
            templated = substitute(job, names)
            raw_name = job.get("name")
            if raw_name is None:
                name = f"{kind}{i}" + "".join(f"-{_name_part(v)}" for v in combo)
            else:
                name = str(templated["name"])
                if combo and not any(f"${{{k}}}" in str(raw_name).replace(" ", "") for k in axes):
                    name += "".join(f"-{_name_part(v)}" for v in combo)
            where = marks.at(("jobs", i, "name") if raw_name is not None else ("jobs", i))
            if not NAME_RE.fullmatch(name):
                raise RecipeError(f"jobs[{i}].name: '{name}' is not a valid job name (letters, digits, '.', '_', '-')",
                                  location=where)
            if name in seen:
                raise RecipeError(f"jobs[{i}].name: '{name}' is also the name of jobs[{seen[name]}]", location=where)
            seen[name] = i
            templated["name"] = name
            out.append(ExpandedJob(i, name, values, templated))
    return out


__all__ = ["ExpandedJob", "expand_jobs", "check_matrix", "substitute"]
