"""Where each LoRA module lands: every spelling of a module name -> one base weight tensor.

kohya, ComfyUI and diffusers spell the same module in several ways (SGM or diffusers block
names, ``.`` or ``_`` separators). The index lists every spelling built from the layout table, so
resolving a LoRA key is a dictionary look-up, never ``_`` -> ``.`` guessing. OpenCLIP-bigG's
q/k/v LoRAs resolve to a row slice of the fused ``in_proj_weight`` (and ``in_proj_bias``); its
``text_projection`` to the transposed single-file matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

from lora_tools.layouts.sdxl import LayoutTable
from lora_tools.layouts.table import Component, KeyMap, module_of

#: Text-encoder modules LoRAs train (kohya targets CLIPAttention and CLIPMLP).
_TE_MODULE_SUFFIXES = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


@dataclass(frozen=True, slots=True)
class ModuleTarget:
    """The base tensors one LoRA module changes: its weight, and its bias when it has one.

    Attributes:
        component: ``unet``, ``te1`` or ``te2``.
        sgm_key: single-file key of the weight tensor that changes.
        diffusers_key: the weight's key inside the diffusers component.
        shape: shape of the weight the module's delta must have, in the diffusers orientation
            (the slice shape for q/k/v of OpenCLIP-bigG; ``(out, in)`` for bigG's ``text_projection``).
        part: ``(index, count)`` row block of ``sgm_key`` (and of ``bias_key``) for fused q/k/v, else ``None``.
        block: the block the module sits in, for per-block reports (``input_blocks.4``).
        bias_key: single-file key of the module's bias (a ``.diff_b``/``.b_norm`` lands there), or
            ``None`` when the module has no bias (attention ``to_q``, ``text_projection``...).
        bias_shape: shape of that bias (the slice shape for fused q/k/v), ``()`` without one.
        transposed: the single file stores the weight transposed relative to diffusers (OpenCLIP-bigG's
            ``text_projection``, used as ``x @ P``): a delta, built in the diffusers orientation, is
            added transposed to ``sgm_key``.
    """

    component: Component
    sgm_key: str
    diffusers_key: str
    shape: tuple[int, ...]
    part: tuple[int, int] | None
    block: str
    bias_key: str | None = None
    bias_shape: tuple[int, ...] = ()
    transposed: bool = False

    @property
    def diffusers_module(self) -> str:
        return module_of(self.diffusers_key)

    @property
    def sgm_module(self) -> str:
        return module_of(self.sgm_key)


class TargetIndex:
    """Look-up from (component, module name in any known spelling) to :class:`ModuleTarget`.

    :attr:`targets` lists the weights trainers adapt (linears, convs, bigG's q/k/v slices); the
    look-up resolves every weight tensor of the UNet and text encoders (norm weights, token and
    position embeddings, OpenCLIP-bigG's transposed ``text_projection``...), each with its bias,
    so full diffs, norm diffs, bias diffs and LoRAs on any of them apply. As in ComfyUI's loader
    (``comfy/lora.py``), a module is named by its weight; its bias diff lands on the bias beside it.
    """

    def __init__(self, table: LayoutTable):
        self._index: dict[tuple[Component, str], ModuleTarget] = {}
        self.targets: list[ModuleTarget] = []
        biases = _biases(table)
        for r in table.rows:
            if r.diffusers is None or not r.diffusers.endswith(".weight") or len(r.diffusers_shape) < 2:
                continue
            if r.component == "vae" or r.transform == "transpose" or "embedding" in r.sgm:
                continue
            dmod = module_of(r.diffusers)
            if r.component in ("te1", "te2") and not dmod.endswith(_TE_MODULE_SUFFIXES):
                continue
            target = _target(r, biases)
            self.targets.append(target)
            names = {dmod}
            if r.transform != "slice":
                names.add(module_of(r.sgm))
            for n in names:
                self._index[(r.component, n)] = target
                self._index[(r.component, n.replace(".", "_"))] = target
        # Every other weight tensor is a target too (norms, embeddings, text_projection), for
        # look-ups only: ``targets`` stays the set trainers adapt (extract and the synthetic LoRAs
        # walk it, in the SGM orientation).
        for r in table.rows:
            if r.diffusers is None or not r.diffusers.endswith(".weight") or r.component == "vae":
                continue
            if r.transform not in ("rename", "transpose"):
                continue
            dmod = module_of(r.diffusers)
            if (r.component, dmod) in self._index:
                continue
            target = _target(r, biases)
            names = {dmod} | ({module_of(r.sgm)} if r.sgm.endswith(".weight") or r.transform == "transpose" else set())
            for n in names:
                self._index.setdefault((r.component, n), target)
                self._index.setdefault((r.component, n.replace(".", "_")), target)

    def lookup(self, component: Component, name: str) -> ModuleTarget | None:
        """The target of a module named ``name`` (dotted or underscored, SGM or diffusers)."""
        return self._index.get((component, name))

    def spellings(self) -> int:
        return len(self._index)

    def why_not(self, component: Component, name: str) -> str | None:
        """Why a module named ``name`` has no target, when SDXL's structure says so, else ``None``.

        Names a weight SDXL does not have: a ``conv_shortcut`` on a resnet whose input and output
        widths are equal, CLIP-L's ``text_projection`` (only OpenCLIP-bigG has one).
        """
        sep = "." if "." in name else "_"
        if component == "unet":
            for short, first in (("conv_shortcut", "conv1"), ("skip_connection", f"in_layers{sep}2")):
                if name.endswith(short):
                    resnet = self.lookup(component, name[: -len(short)] + first)
                    if resnet is not None:
                        parent = resnet.diffusers_module.rsplit(".", 1)[0]
                        return (f"SDXL's resnet {parent} has no conv_shortcut (its input and output widths are equal), "
                                "so that LoRA module changes nothing SDXL has")
            return None
        if component == "te1" and name.endswith("text_projection"):
            return "CLIP-L (te1) has no text_projection: only OpenCLIP-bigG (te2) has one"
        return None


def _biases(table: LayoutTable) -> dict[tuple[Component, str, tuple[int, int] | None], KeyMap]:
    """The bias rows of ``table`` by (component, diffusers module, slice part)."""
    out: dict[tuple[Component, str, tuple[int, int] | None], KeyMap] = {}
    for r in table.rows:
        if r.diffusers is not None and r.diffusers.endswith(".bias"):
            out[(r.component, module_of(r.diffusers), r.part)] = r
    return out


def _target(r: KeyMap, biases: dict[tuple[Component, str, tuple[int, int] | None], KeyMap]) -> ModuleTarget:
    assert r.diffusers is not None
    b = biases.get((r.component, module_of(r.diffusers), r.part))
    return ModuleTarget(r.component, r.sgm_key, r.diffusers, r.diffusers_shape, r.part, _block_of(r.component, r.sgm),
                        bias_key=b.sgm_key if b is not None else None,
                        bias_shape=b.diffusers_shape if b is not None else (),
                        transposed=r.transform == "transpose")


def _block_of(component: Component, sgm: str) -> str:
    parts = sgm.split(".")
    if component == "unet":
        if parts[0] in ("input_blocks", "output_blocks"):
            return ".".join(parts[:2])
        return parts[0]
    if component == "te1":
        return ".".join(parts[:4]) if parts[:3] == ["text_model", "encoder", "layers"] else parts[0]
    return ".".join(parts[:3]) if parts[:2] == ["transformer", "resblocks"] else parts[0]
