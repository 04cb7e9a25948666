"""The recipe schema (``version: 1``), as pydantic v2 models that refuse unknown keys.

A recipe names its inputs once, then jobs that use them by name::

    version: 1
    output_dir: out
    inputs:
      juggernaut: models/juggernaut.safetensors          # a local file
      lightning: {path: lightning/}                      # a folder (Lightning files)
      style: {hub: owner/repo/style.safetensors, revision: 0123abcd..., sha256: ...}
    matrix:
      steps: [2, 4, 8]
    jobs:
      - name: juggernaut-${steps}step
        fuse: {base: juggernaut, preset: lightning-${steps}step, preset_dir: lightning,
               output: juggernaut-lightning-${steps}step.safetensors}

Job options are the operation's options model (:mod:`lora_tools.ops.registry`), the very declaration
the command's options are generated from, so they carry the same names (``fuse``: ``preset``,
``strength``, ``method``, ``loras``, ``saves``, ``dtype``, ``output``, ``preset_dir``, ``variant`` ...;
``merge``: ``loras`` with a ``weight`` each, ``method``, ``rank``; ``verify``: ``model``, ``against``,
``loras``, ``prompts``, ``seeds``, ``size``, ``out`` ...; ``publish``: ``path``, ``repo``, ``license``,
``release_dir``, ``dry_run``). A job writes ``output`` (``verify``: the folder ``out``; ``publish``:
``release_dir``). Deprecated but still read: a fuse's ``lightning_dir`` (read as ``preset_dir``, noted in
the ``-v`` log); ``lightning: N`` stays the shorthand of ``preset: lightning-Nstep`` (recorded as the latter).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from lora_tools.hub import REPO_ID_RE
from lora_tools.ops.fields import Location
from lora_tools.ops.registry import OPS, Operation
from lora_tools.ops.verbs._lora import LoraRef, WeightedRef
from lora_tools.ops.verbs.analyze import AnalyzeOptions
from lora_tools.ops.verbs.convert import ConvertOptions
from lora_tools.ops.verbs.extract import ExtractOptions
from lora_tools.ops.verbs.fuse import FuseOptions
from lora_tools.ops.verbs.merge import MergeOptions
from lora_tools.ops.verbs.publish import PublishOptions
from lora_tools.ops.verbs.rescale import RescaleOptions
from lora_tools.ops.verbs.resize import ResizeOptions
from lora_tools.ops.verbs.verify import VerifyOptions

#: Job kinds this version runs: the operations of the registry.
JOB_KINDS = tuple(OPS)
#: The option naming what a kind writes (a file, or for ``verify``/``publish`` a folder).
OUTPUT_KEYS = {name: op.output_keys[0] for name, op in OPS.items()}
SHA256_RE = re.compile(r"^[0-9a-fA-F]{64}$")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+=,-]*$")

Scalar = int | float | str | bool


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FileInput(_Strict):
    """A local file or folder, or an object (``s3://BUCKET/KEY``); ``sha256`` pins a file's content."""

    path: Location
    sha256: str | None = None

    @field_validator("sha256")
    @classmethod
    def _hex(cls, v: str | None) -> str | None:
        if v is not None and not SHA256_RE.fullmatch(v):
            raise ValueError(f"expected 64 hex characters, got '{v}'")
        return v.lower() if v else v


class HubInput(_Strict):
    """A hub file ``owner/repo/path/in/repo``, pinned by ``revision`` (a commit or tag)."""

    hub: str
    revision: str
    sha256: str | None = None

    @field_validator("hub")
    @classmethod
    def _ref(cls, v: str) -> str:
        parts = v.split("/")
        if len(parts) < 3 or not REPO_ID_RE.fullmatch("/".join(parts[:2])) or any(p in ("", ".", "..") for p in parts[2:]):
            raise ValueError(f"expected owner/repo/path/to/file, got '{v}'")
        return v

    @field_validator("revision")
    @classmethod
    def _rev(cls, v: str) -> str:
        if not v or any(c.isspace() for c in v) or ".." in v:
            raise ValueError(f"expected a commit hash or tag, got '{v}'")
        return v

    @field_validator("sha256")
    @classmethod
    def _hex(cls, v: str | None) -> str | None:
        return FileInput._hex(v)

    @property
    def repo_id(self) -> str:
        return "/".join(self.hub.split("/")[:2])

    @property
    def filename(self) -> str:
        return "/".join(self.hub.split("/")[2:])


def recipe_options_model(op: Operation) -> type[BaseModel]:
    """The options a recipe job of ``op`` takes: the operation's own model, with the options the command
    defaults but a recipe must give (a fuse's ``output``) made required."""
    if not op.recipe_required:
        return op.options_model
    fields: dict[str, Any] = {k: (str, Field(description=op.options_model.model_fields[k].description))
                              for k in op.recipe_required}
    return create_model(op.options_model.__name__, __base__=op.options_model, **fields)


class _JobBase(_Strict):
    """One job: an optional ``name`` and exactly one kind key (``fuse: {...}``)."""

    name: str | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> _JobBase:
        kinds = [k for k in JOB_KINDS if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError(f"a job needs exactly one of: {', '.join(JOB_KINDS)}")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in JOB_KINDS if getattr(self, k) is not None)

    @property
    def options(self) -> BaseModel:
        return getattr(self, self.kind)


#: One job: ``name`` and one key per operation of the registry (derived, never listed by hand).
Job = create_model("Job", __base__=_JobBase,
                   **{name: (recipe_options_model(op) | None, None) for name, op in OPS.items()})  # type: ignore[call-overload]


def _input_tag(v: Any) -> str:
    if isinstance(v, str):
        return "str"
    if isinstance(v, dict) and "hub" in v:
        return "hub"
    if isinstance(v, (FileInput, HubInput)):
        return "hub" if isinstance(v, HubInput) else "file"
    return "file"


#: An input: a path string, ``{path:, sha256:}`` or ``{hub:, revision:, sha256:}``.
InputSpec = Annotated[Annotated[Location, Tag("str")] | Annotated[FileInput, Tag("file")] | Annotated[HubInput, Tag("hub")], Discriminator(_input_tag)]
#: Union tags pydantic puts into error locations (dropped when errors are shown).
UNION_TAGS = ("str", "file", "hub")


class RecipeHead(_Strict):
    """The recipe without its jobs' options (those are checked after the matrix expands them)."""

    version: Literal[1]
    created: str | None = None
    output_dir: Location = "."
    vars: dict[str, Scalar] = Field(default_factory=dict)
    inputs: dict[str, InputSpec] = Field(default_factory=dict)
    matrix: dict[str, list[Scalar]] = Field(default_factory=dict)
    jobs: list[dict[str, Any]]

    @field_validator("created")
    @classmethod
    def _time(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", v):
            raise ValueError(f"expected a UTC time like 2026-11-25T23:59:00Z, got '{v}'")
        return v


def _fields_of(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The valid keys at ``loc`` inside ``model`` (for 'did you mean')."""
    current: Any = model
    for part in loc:
        if isinstance(part, int) or (part in UNION_TAGS and current is not model):
            continue
        fields = getattr(current, "model_fields", None)
        if not fields or part not in fields:
            return []
        ann = fields[part].annotation
        inner = [a for a in _flatten(ann) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not inner:
            return []
        current = inner[0]
    return list(getattr(current, "model_fields", {}))


def _flatten(ann: Any) -> list[Any]:
    args = getattr(ann, "__args__", None)
    if not args:
        return [ann]
    return [x for a in args for x in _flatten(a)]


def describe(value: Any) -> str:
    """A value as messages quote it: ``'high'``, ``5``, ``a list``."""
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "nothing (null)"
    return str(value).lower() if isinstance(value, bool) else str(value)


_EXPECTED = {
    "float_parsing": "expected a number", "float_type": "expected a number",
    "int_parsing": "expected an integer", "int_type": "expected an integer", "int_from_float": "expected an integer",
    "bool_parsing": "expected true or false", "bool_type": "expected true or false",
    "string_type": "expected a string", "list_type": "expected a list", "dict_type": "expected a mapping",
    "model_type": "expected a mapping", "model_attributes_type": "expected a mapping",
    "finite_number": "expected a finite number",
}


def error_from_validation(e: ValidationError, model: type[BaseModel], prefix: tuple[Any, ...],
                          place: Any) -> tuple[str, str]:
    """The first pydantic error as ``(location, message)``: ``jobs[1].fuse.strength: expected a
    number, got 'high'``. ``place(path, key=bool)`` gives ``file:line:column`` of a path."""
    import difflib

    errors = e.errors(include_url=False)
    err = next((x for x in errors if x["type"] == "extra_forbidden"), errors[0])  # a typo explains the rest
    loc = tuple(err["loc"])
    if len(loc) > 2 and loc[0] == "inputs" and loc[2] in UNION_TAGS:
        loc = loc[:2] + loc[3:]
    kind = err["type"]
    if kind == "extra_forbidden":
        key = loc[-1]
        valid = (["path", "sha256", "hub", "revision"] if model is RecipeHead and loc[:1] == ("inputs",) and len(loc) == 3
                 else _fields_of(model, loc[:-1]))
        close = difflib.get_close_matches(str(key), valid, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else (f" (valid keys: {', '.join(valid)})" if valid else "")
        parent = dotted(prefix + loc[:-1])
        return place(prefix + loc, key=True), (f"{parent}: " if parent else "") + f"unknown key '{key}'{hint}"
    if kind == "missing":
        return place(prefix + loc[:-1]), f"{dotted(prefix + loc[:-1])}: missing required key '{loc[-1]}'"
    got = err.get("input")
    if kind in _EXPECTED:
        text = f"{_EXPECTED[kind]}, got {describe(got)}"
    elif kind in ("literal_error", "enum"):
        text = f"expected {err['ctx'].get('expected', '')}, got {describe(got)}"
    elif kind == "value_error":
        text = str(err["ctx"]["error"])
    else:
        text = err["msg"][0].lower() + err["msg"][1:]
    where = dotted(prefix + loc)
    return place(prefix + loc), (f"{where}: {text}" if where else text)


def dotted(path: tuple[Any, ...]) -> str:
    """``("jobs", 1, "fuse", "strength")`` -> ``jobs[1].fuse.strength``."""
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


__all__ = ["error_from_validation", "dotted", "describe", "RecipeHead", "Job", "FuseOptions", "LoraRef", "FileInput",
           "HubInput", "JOB_KINDS", "OUTPUT_KEYS", "RescaleOptions", "ResizeOptions", "MergeOptions", "WeightedRef",
           "ConvertOptions", "ExtractOptions", "AnalyzeOptions", "VerifyOptions", "PublishOptions"]
