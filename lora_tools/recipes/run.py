"""Load a recipe, validate all of it, plan every job, then run them through an executor.

Everything that can be checked is checked before any job runs: the schema, the matrix and
templates, that input files exist and match their pinned sha256, that hub references are well
formed and resolve, that no two jobs write one output and every output stays inside
``output_dir``, and each job's own plan (the library's ``plan_*`` functions). Then jobs whose
outputs already hold the same record are skipped, the others run.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from lora_tools.errors import LoraToolsError, RecipeError
from lora_tools.io.remote import as_path, is_url, place
from lora_tools.ops.registry import OPS
from lora_tools.recipes.executor import EventHook, Executor, LocalExecutor
from lora_tools.recipes.expand import ExpandedJob, check_matrix, expand_jobs
from lora_tools.recipes.jobs import JobCheck, JobResult, ResolvedJob
from lora_tools.recipes.loader import Marks, load_file, load_text
from lora_tools.recipes.registry import check_job
from lora_tools.recipes.schema import OUTPUT_KEYS, FileInput, HubInput, Job, RecipeHead, dotted, error_from_validation
from lora_tools.special_files import special_kind

#: Top-level keys ``--set`` may change directly.
_SETTABLE = ("output_dir", "created")


@dataclass
class RecipePlan:
    """A validated recipe: its jobs, resolved and checked, in run order."""

    path: Path
    jobs: list[ResolvedJob]
    checks: dict[str, JobCheck] = field(default_factory=dict)
    inputs: dict[str, str] = field(default_factory=dict)
    output_dir: Path = Path(".")
    all_outputs: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def outputs_of(self, name: str) -> tuple[str, ...]:
        """The outputs of job ``name`` (also of jobs left out by ``only``)."""
        return self.all_outputs.get(name, ())

    def selected(self, only: Sequence[str] = ()) -> list[ResolvedJob]:
        """The jobs named in ``only`` (``fnmatch`` patterns), or all."""
        import fnmatch

        if not only:
            return list(self.jobs)
        return [j for j in self.jobs if any(fnmatch.fnmatchcase(j.name, p) for p in only)]


def parse_set(item: str) -> tuple[str, Any]:
    """``key=value`` of ``--set`` (the value read as a YAML scalar or list).

    Raises:
        [`RecipeError`]: no ``=``, or an unreadable value.
    """
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise RecipeError(f"'{item}' is not key=value", location="--set")
    value, _ = load_text(text, f"--set {key}") if text.strip() else ("", None)
    if isinstance(value, dict):
        raise RecipeError(f"'{item}': the value must be a string, number or list", location="--set")
    return key.strip(), value


def apply_sets(doc: dict[str, Any], sets: Sequence[str], marks: Marks) -> None:
    """Apply ``--set key=value`` items to the raw recipe: an input name replaces that input's path
    (its sha256 pin kept), a ``vars`` or top-level key its value, a dotted key any value.
    Paths given this way are relative to the current folder."""
    for item in sets:
        key, value = parse_set(item)
        where = f"--set {key}"
        raw_inputs = doc.get("inputs")
        inputs: dict[str, Any] = raw_inputs if isinstance(raw_inputs, dict) else {}
        if "." not in key and key in inputs:
            path = str(place(str(value), Path.cwd()))
            pinned = inputs[key].get("sha256") if isinstance(inputs[key], dict) else None
            inputs[key] = {"path": path, "sha256": pinned} if pinned else path  # a hub input becomes local
            marks.marks[("inputs", key)] = where
        elif "." not in key and key in (doc.get("vars") or {}):
            doc["vars"][key] = value
            marks.marks[("vars", key)] = where
        elif "." not in key and key in _SETTABLE:
            doc[key] = str(place(str(value), Path.cwd())) if key == "output_dir" else value
            marks.marks[(key,)] = where
        elif "." in key:
            parts: list[Any] = [int(p) if p.isdigit() else p for p in key.split(".")]
            node: Any = doc
            for p in parts[:-1]:
                try:
                    node = node[p]
                except (KeyError, IndexError, TypeError):
                    raise RecipeError(f"'{key}' names nothing in the recipe", location=where) from None
            try:
                node[parts[-1]] = value
            except (IndexError, TypeError):
                raise RecipeError(f"'{key}' names nothing in the recipe", location=where) from None
            marks.marks[tuple(parts)] = where
        else:
            names = sorted(set(inputs) | set(doc.get("vars") or {}) | set(_SETTABLE))
            import difflib

            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (inputs, vars: {', '.join(names)})"
            raise RecipeError(f"'{key}' is not an input, a var or a settable key{hint}", location=where)


def _resolve_inputs(head: RecipeHead, folder: Path, marks: Marks) -> dict[str, str]:
    from lora_tools.hub import resolve_file
    from lora_tools.io.hashing import sha256_file

    out: dict[str, str] = {}
    for name, spec in head.inputs.items():
        where = marks.at(("inputs", name))
        if isinstance(spec, str):
            spec = FileInput(path=spec)
        if isinstance(spec, HubInput):
            try:
                path = resolve_file(spec.repo_id, spec.filename, revision=spec.revision, hint=None,
                                    instead="give the input as a local path")
            except LoraToolsError as e:
                raise RecipeError(f"inputs.{name}: {e}", location=where) from None
        else:
            path = place(spec.path, folder)
            if not path.exists():
                raise RecipeError(f"inputs.{name}: '{spec.path}' does not exist", location=where)
            kind = special_kind(path)
            if kind is not None:
                raise RecipeError(f"inputs.{name}: '{spec.path}' is {kind}, not a regular file or folder",
                                  location=where)
        if spec.sha256 is not None:
            if not path.is_file():
                raise RecipeError(f"inputs.{name}: '{path}' is a folder: sha256 pins files only", location=where)
            actual = sha256_file(path)
            if actual != spec.sha256:
                raise RecipeError(f"inputs.{name}: sha256 mismatch: the recipe pins {spec.sha256[:16]}..., "
                                  f"'{path.name}' has {actual[:16]}...", location=where)
        out[name] = str(path.resolve())
    return out


def _references(kind: str) -> tuple[str, ...]:
    """Options of ``kind`` whose values name an input, a job or a path (``loras`` lists are resolved apart)."""
    op = OPS[kind]
    return tuple(k for k in (*op.input_keys, *op.references) if k != "loras")


def _validate_job(ej: ExpandedJob, marks: Marks) -> Job:
    try:
        return Job.model_validate(ej.raw)
    except ValidationError as e:
        where, message = error_from_validation(e, Job, ("jobs", ej.index), marks.at)
        suffix = f" (job '{ej.name}')" if ej.values else ""
        raise RecipeError(message + suffix, location=where) from None


def plan_recipe(path: str | Path, *, sets: Sequence[str] = (), only: Sequence[str] = (), check: bool = True) -> RecipePlan:
    """Load, validate and resolve a recipe file, and check every job's plan.

    Args:
        path: the recipe (YAML).
        sets: ``key=value`` overrides (see :func:`apply_sets`).
        only: job-name patterns (``fnmatch``): plan and keep only these jobs.
        check: plan each job through the library (``False`` for a schema-only look).

    Raises:
        [`RecipeError`]: anything wrong with the recipe, with ``location`` ``file:line:column``.
    """
    recipe_path = Path(path)
    doc, marks = load_file(recipe_path)
    if not isinstance(doc, dict):
        raise RecipeError("a recipe is a mapping (version, inputs, matrix, jobs)", location=marks.at(()))
    doc = copy.deepcopy(doc)
    apply_sets(doc, sets, marks)
    try:
        head = RecipeHead.model_validate(doc)
    except ValidationError as e:
        where, message = error_from_validation(e, RecipeHead, (), marks.at)
        raise RecipeError(message, location=where) from None
    if not head.jobs:
        raise RecipeError("jobs: empty: a recipe needs at least one job", location=marks.at(("jobs",)))
    check_matrix(head.matrix, doc, marks)
    folder = recipe_path.resolve().parent
    expanded = expand_jobs(head.jobs, head.matrix, head.vars, marks)
    validated = [(ej, _validate_job(ej, marks)) for ej in expanded]
    inputs = _resolve_inputs(head, folder, marks)
    output_dir = place(head.output_dir, folder)
    job_names = {ej.name for ej in expanded}
    clash = job_names & set(inputs)
    if clash:
        name = sorted(clash)[0]
        raise RecipeError(f"'{name}' names both an input and a job", location=marks.at(("inputs", name), key=True))

    outputs_of: dict[str, tuple[str, ...]] = {}
    written: dict[str, str] = {}
    for ej, job in validated:
        opts = job.options.model_dump()
        key = OUTPUT_KEYS.get(job.kind, "output")
        out_where = marks.at(("jobs", ej.index, job.kind, key))
        target = as_path(opts[key]) if is_url(opts[key]) else (output_dir / opts[key]).resolve()
        if not _inside(target, output_dir) or target == output_dir:
            raise RecipeError(f"jobs[{ej.index}].{job.kind}.{key}: '{opts[key]}' leaves the output folder "
                              f"'{output_dir}'" + (f" (job '{ej.name}')" if ej.values else ""), location=out_where)
        opts[key] = str(target)
        outs = OPS[job.kind].output_paths(opts)
        for o in outs:
            clash_with = next((w for w in written if w == o or _inside(Path(o), Path(w)) or _inside(Path(w), Path(o))),
                              None)
            if clash_with is not None:
                raise RecipeError(f"jobs[{ej.index}].{job.kind}.{key}: '{Path(o).name}' is also written by job "
                                  f"'{written[clash_with]}'", location=out_where)
            written[o] = ej.name
        outputs_of[ej.name] = outs
        ej.raw[job.kind] = opts  # resolved below

    def ref(value: str, path: tuple[Any, ...], own: str, deps: list[str]) -> str:
        """The path a job's reference ``value`` names; an output of another job adds that job to ``deps``."""
        if value in inputs:
            return inputs[value]
        if value in outputs_of:
            if value == own:
                raise RecipeError(f"{dotted(path)}: a job cannot use its own output", location=marks.at(path))
            if not outputs_of[value]:
                raise RecipeError(f"{dotted(path)}: job '{value}' writes nothing (a dry run)", location=marks.at(path))
            deps.append(value)
            return outputs_of[value][0]
        head, sep, rest = value.partition("/")
        if sep and head in inputs and Path(inputs[head]).is_dir():  # a file inside a folder input
            inner = Path(inputs[head]) / rest
            if not inner.exists():
                raise RecipeError(f"{dotted(path)}: '{value}': input '{head}' ({inputs[head]}) holds no '{rest}'",
                                  location=marks.at(path))
            return str(inner.resolve())
        p = place(value, folder)
        if not p.exists():
            known = ", ".join(sorted(inputs) + sorted(outputs_of)) or "none"
            raise RecipeError(f"{dotted(path)}: '{value}' is not an input, a job or an existing file "
                              f"(inputs and jobs: {known})", location=marks.at(path))
        return str(p.resolve())

    by_kind = {ej.name: job.kind for ej, job in validated}
    resolved: list[ResolvedJob] = []
    for ej, job in validated:
        opts = ej.raw[job.kind]
        deps: list[str] = []

        for key in _references(job.kind):
            if opts.get(key) is not None:
                opts[key] = ref(opts[key], ("jobs", ej.index, job.kind, key), ej.name, deps)
        for i, lora in enumerate(opts.get("loras") or []):
            if isinstance(lora, dict):
                lora["lora"] = ref(lora["lora"], ("jobs", ej.index, job.kind, "loras", i, "lora"), ej.name, deps)
            else:
                opts["loras"][i] = ref(lora, ("jobs", ej.index, job.kind, "loras", i), ej.name, deps)
        for i, name in enumerate(opts.get("verify") or []) if job.kind == "publish" else ():
            at = ("jobs", ej.index, job.kind, "verify", i)
            if name not in outputs_of or not name or by_kind.get(name) != "verify":
                raise RecipeError(f"{dotted(at)}: '{name}' is not a verify job of this recipe", location=marks.at(at))
            deps.append(name)
            opts["verify"][i] = outputs_of[name][0]
        resolved.append(ResolvedJob(ej.name, job.kind, opts, outputs_of[ej.name], tuple(dict.fromkeys(deps)),
                                    head.created, marks.at(("jobs", ej.index))))
    plan = RecipePlan(recipe_path, _in_order(resolved, marks), {}, inputs, output_dir, outputs_of)
    from lora_tools.recipes.containment import check_outputs_against_inputs

    check_outputs_against_inputs(plan.jobs, {j.kind: _references(j.kind) for j in plan.jobs})
    if only:
        chosen = plan.selected(only)
        if not chosen:
            raise RecipeError(f"no job matches {', '.join(only)} (jobs: {', '.join(j.name for j in plan.jobs)})",
                              location="--only")
        plan.jobs = chosen
    if check:
        check_all(plan)
    return plan


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.relative_to(folder)
        return True
    except ValueError:
        return False


def _in_order(jobs: list[ResolvedJob], marks: Marks) -> list[ResolvedJob]:
    by_name = {j.name: j for j in jobs}
    done: dict[str, None] = {}
    visiting: set[str] = set()

    def visit(j: ResolvedJob) -> None:
        if j.name in done:
            return
        if j.name in visiting:
            raise RecipeError(f"jobs use each other's outputs in a cycle (through '{j.name}')", location=j.source)
        visiting.add(j.name)
        for d in j.depends_on:
            visit(by_name[d])
        visiting.discard(j.name)
        done[j.name] = None

    for j in jobs:
        visit(j)
    return [by_name[n] for n in done]


def check_all(plan: RecipePlan) -> None:
    """Plan every job whose inputs exist (library checks); a job reading another's output that is
    not written yet is ``pending``. Raises the first problem as a :class:`RecipeError`."""
    for job in plan.jobs:
        pending = [d for d in job.depends_on if (d in plan.checks and plan.checks[d].state != "skip")
                   or not all(as_path(o).exists() for o in plan.outputs_of(d))]
        if pending:
            plan.checks[job.name] = JobCheck("pending", f"after '{pending[0]}'")
            continue
        try:
            plan.checks[job.name] = check_job(job)
        except LoraToolsError as e:
            raise RecipeError(f"job '{job.name}': {e}", location=job.source) from None
        except OSError as e:  # a name too long, a link loop...: the one boundary's line, at the job
            from lora_tools.error_text import describe

            raise RecipeError(f"job '{job.name}': {describe(e).message}", location=job.source) from None


def run_recipe(plan: RecipePlan | str | Path, *, executor: Executor | None = None, only: Sequence[str] = (),
               fail_fast: bool = False, on_event: EventHook | None = None, sets: Sequence[str] = ()) -> list[JobResult]:
    """Run the planned jobs (``only``: name patterns) through ``executor`` (default: local). ``plan`` may
    be a recipe file: it is planned first (:func:`plan_recipe` with ``sets`` and ``only``)."""
    if not isinstance(plan, RecipePlan):
        plan = plan_recipe(plan, sets=sets, only=only)
    jobs = plan.selected(only)
    return (executor or LocalExecutor()).execute(jobs, fail_fast=fail_fast, on_event=on_event)


__all__ = ["RecipePlan", "plan_recipe", "run_recipe", "check_all", "apply_sets", "parse_set"]
