"""The operation registry: every verb declared once, the one table the CLI, recipes and records read.

An :class:`Operation` names a verb, its options model (pydantic: the option names, types,
defaults and help of both ``loratool VERB`` and a recipe's ``VERB:`` job), which options name the
files it reads (hashed into its record) and what it writes, and its ``plan`` (everything checked,
nothing written) and ``run`` (write, return one :class:`OpResult`). The click command's options,
the recipe schema (``Job``), the job adapters and the record entry are derived from it.

The types are in :mod:`lora_tools.ops.operation`. This module and the verb modules it lists import
no torch: the CLI builds its options from them at start. Adding a verb is one module in
:mod:`lora_tools.ops.verbs` and one line in :func:`_declared`.

Example:
    >>> from lora_tools.ops.registry import OPS
    >>> op = OPS["rescale"]
    >>> result = op(op.options_model(lora="style.safetensors", strength=0.6, output="half.safetensors"))
    >>> result.files
    [PosixPath('half.safetensors')]
"""

from __future__ import annotations

from lora_tools.ops.operation import Operation, OpResult, Options, Writes, cli, cli_spec


def _declared() -> tuple[Operation, ...]:
    """Every operation, one line each (a new verb adds its module and its line here)."""
    from lora_tools.ops.verbs import analyze, convert, extract, fuse, merge, publish, rescale, resize, verify

    return (
        fuse.OPERATION,
        rescale.OPERATION,
        resize.OPERATION,
        merge.OPERATION,
        convert.OPERATION,
        extract.OPERATION,
        analyze.OPERATION,
        verify.OPERATION,
        publish.OPERATION,
    )


#: Verb -> its declaration, in the order commands and job kinds are listed.
OPS: dict[str, Operation] = {op.name: op for op in _declared()}


def get_operation(name: str) -> Operation:
    """The operation called ``name``.

    Raises:
        [`UsageError`]: no such operation (the nearest name suggested).
    """
    if name in OPS:
        return OPS[name]
    import difflib

    from lora_tools.errors import UsageError

    close = difflib.get_close_matches(name, list(OPS), n=1)
    raise UsageError(f"unknown operation '{name}'" + (f" (did you mean '{close[0]}'?)" if close else "")
                     + f"; operations: {', '.join(OPS)}")


__all__ = ["Operation", "OpResult", "Options", "OPS", "get_operation", "cli", "cli_spec", "Writes"]
