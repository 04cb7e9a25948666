"""Importing ComfyUI's own code (the oracle of the ComfyUI tests and benchmark) with a CPU-only torch.

ComfyUI imports ``torchvision.transforms`` at module level for models we never build (Cosmos, Stable Cascade).
PyPI's torchvision wheels need CUDA torch; with a CPU-only torch they cannot be imported, so an empty stand-in
takes its place, only where the real one does not import. Standard library only (imports inside the functions).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

_NAMES = ("torchvision", "torchvision.transforms")


def install_torchvision_stand_in() -> list[object]:
    """Put an empty ``torchvision`` (with ``transforms``) in ``sys.modules`` unless the real one imports; the
    modules put there (none when the real one imported), for :func:`remove_torchvision_stand_in`."""
    import importlib.machinery
    import types

    try:
        import torchvision  # noqa: F401

        return []
    except Exception:  # noqa: BLE001 - any failure: not importable here
        sys.modules.pop("torchvision", None)
    import transformers  # decides "is torchvision available" before the stand-in exists

    del transformers
    tv = types.ModuleType("torchvision")
    tv.__spec__ = importlib.machinery.ModuleSpec("torchvision", None)
    transforms = types.ModuleType("torchvision.transforms")
    tv.transforms = transforms  # type: ignore[attr-defined]
    sys.modules.update(zip(_NAMES, (tv, transforms), strict=True))
    return [tv, transforms]


def remove_torchvision_stand_in(installed: list[object]) -> None:
    """Take the stand-in modules back out of ``sys.modules`` (those still there)."""
    for name in _NAMES:
        if sys.modules.get(name) in installed:
            del sys.modules[name]


@contextlib.contextmanager
def torchvision_stand_in() -> Iterator[None]:
    """The stand-in while ComfyUI's modules import, removed afterwards so that nothing else sees it."""
    installed = install_torchvision_stand_in()
    try:
        yield
    finally:
        remove_torchvision_stand_in(installed)


__all__ = ["install_torchvision_stand_in", "remove_torchvision_stand_in", "torchvision_stand_in"]
