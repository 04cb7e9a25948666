"""Read a recipe file: safe YAML only, every value's ``file:line:column`` kept, aliases bounded.

PyYAML composes the node graph; we build the Python values ourselves from it, so that

* only the plain YAML types exist (mapping, sequence, str, int, float, bool, null): any other tag
  (``!!python/object``, ``!!binary``, custom ``!tags``) is refused with its place;
* an alias is expanded at most :data:`MAX_NODES` nodes in total, so a "billion laughs" file is
  refused instead of eating the memory;
* every value has a mark: :class:`Marks` maps a path such as ``("jobs", 1, "fuse", "strength")``
  to ``recipe.yaml:12:5``, which errors use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from yaml.constructor import ConstructorError, SafeConstructor

from lora_tools.errors import RecipeError

#: The most value nodes one recipe may expand to (aliases included); real recipes have hundreds.
MAX_NODES = 20_000
#: The most alias uses in one recipe.
MAX_ALIASES = 200

_MAP = "tag:yaml.org,2002:map"
_SEQ = "tag:yaml.org,2002:seq"
_SCALARS = {f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null")}

PathKey = tuple[Any, ...]


@dataclass
class Marks:
    """Where each value of a recipe came from: path -> ``file:line:column`` (1-based)."""

    name: str
    marks: dict[PathKey, str] = field(default_factory=dict)
    #: Marks of the *keys* of mappings (path of the value -> place of its key).
    key_marks: dict[PathKey, str] = field(default_factory=dict)

    def at(self, path: PathKey, *, key: bool = False) -> str:
        """The place of ``path``, or of its nearest known parent."""
        table = self.key_marks if key else self.marks
        p = tuple(path)
        while p:
            if p in table:
                return table[p]
            if p in self.marks:
                return self.marks[p]
            p = p[:-1]
        return self.marks.get((), f"{self.name}:1:1")


def _place(name: str, mark: yaml.Mark) -> str:
    return f"{name}:{mark.line + 1}:{mark.column + 1}"


class _Builder:
    def __init__(self, name: str) -> None:
        self.name = name
        self.marks = Marks(name)
        self.nodes = 0
        self.aliases = 0
        self.constructor = SafeConstructor()

    def build(self, node: yaml.Node, path: PathKey, stack: tuple[int, ...] = ()) -> Any:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise RecipeError(f"the document expands to more than {MAX_NODES} values (aliases nested too deep?): "
                              "refusing it", location=_place(self.name, node.start_mark))
        if id(node) in stack:
            raise RecipeError("a recursive alias: refusing it", location=_place(self.name, node.start_mark))
        self.marks.marks.setdefault(path, _place(self.name, node.start_mark))
        if isinstance(node, yaml.MappingNode):
            if node.tag != _MAP:
                raise self._tag(node)
            out: dict[str, Any] = {}
            for key_node, value_node in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    raise RecipeError("'<<' merge keys are not supported in recipes",
                                      location=_place(self.name, key_node.start_mark))
                key = self.build(key_node, path + ("<key>",), stack + (id(node),))
                if not isinstance(key, (str, int)) or isinstance(key, bool):
                    raise RecipeError(f"keys must be strings, got {key!r}", location=_place(self.name, key_node.start_mark))
                key = str(key)
                if key in out:
                    raise RecipeError(f"duplicate key '{key}'", location=_place(self.name, key_node.start_mark))
                self.marks.key_marks[path + (key,)] = _place(self.name, key_node.start_mark)
                out[key] = self.build(value_node, path + (key,), stack + (id(node),))
            return out
        if isinstance(node, yaml.SequenceNode):
            if node.tag != _SEQ:
                raise self._tag(node)
            return [self.build(item, path + (i,), stack + (id(node),)) for i, item in enumerate(node.value)]
        if node.tag not in _SCALARS:
            raise self._tag(node)
        try:
            return self.constructor.construct_object(node, deep=True)
        except ConstructorError as e:
            raise RecipeError(f"unreadable value: {e.problem}", location=_place(self.name, node.start_mark)) from None

    def _tag(self, node: yaml.Node) -> RecipeError:
        tag = node.tag.replace("tag:yaml.org,2002:", "!!")
        return RecipeError(f"tag '{tag}' is not allowed: recipes are plain YAML (mappings, lists, strings, numbers)",
                           location=_place(self.name, node.start_mark))


class _CountingLoader(yaml.SafeLoader):
    """SafeLoader that counts aliases while composing (a bomb is refused before it is expanded)."""

    aliases = 0
    display = "recipe"

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_ALIASES:
                event = self.peek_event()
                raise RecipeError(f"more than {MAX_ALIASES} aliases: refusing the document (a 'billion laughs' file?)",
                                  location=_place(self.display, event.start_mark))
        return super().compose_node(parent, index)


def load_text(text: str, name: str) -> tuple[Any, Marks]:
    """Parse recipe ``text`` (named ``name`` in messages) into plain values and their marks.

    Raises:
        [`RecipeError`]: not YAML, several documents, a non-plain tag, too many aliases or values.
    """
    loader = _CountingLoader(text)
    loader.display = name
    try:
        node = loader.get_single_node()
    except RecipeError:
        raise
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = _place(name, mark) if mark is not None else name
        raise RecipeError(f"not valid YAML: {e.problem or e.context}", location=where) from None
    except yaml.YAMLError as e:
        raise RecipeError(f"not valid YAML: {e}", location=name) from None
    finally:
        loader.dispose()
    if node is None:
        raise RecipeError("the recipe is empty", location=f"{name}:1:1")
    builder = _Builder(name)
    return builder.build(node, ()), builder.marks


def load_file(path: str | Path) -> tuple[Any, Marks]:
    """Read and parse a recipe file (see :func:`load_text`).

    Raises:
        [`RecipeError`]: the file cannot be read, or is not a valid recipe document.
    """
    from lora_tools.special_files import special_kind

    p = Path(path)
    kind = special_kind(p)
    if kind is not None:
        raise RecipeError(f"the recipe is {kind}, not a regular file: name a recipe file", location=str(path))
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(f"cannot read the recipe: {type(e).__name__}: {e}", location=str(path)) from None
    return load_text(text, str(path))


__all__ = ["Marks", "load_file", "load_text", "MAX_NODES", "MAX_ALIASES"]
