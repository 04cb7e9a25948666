"""Where each LoRA module lands: every spelling of a module name -> one base weight tensor.

kohya, ComfyUI and diffusers spell the same module in several ways (SGM or diffusers block
names, ``.`` or ``_`` separators). The index lists every spelling built from the layout table, so
resolving a LoRA key is a dictionary look-up, never ``_`` -> ``.`` guessing. OpenCLIP-bigG's
q/k/v LoRAs resolve to a row slice of the fused ``in_proj_weight``.
"""

from __future__ import annotations

from dataclasses import dataclass

from lora_tools.layouts.sdxl import LayoutTable
from lora_tools.layouts.table import Component, module_of

#: Text-encoder modules LoRAs train (kohya targets CLIPAttention and CLIPMLP).
_TE_MODULE_SUFFIXES = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


@dataclass(frozen=True, slots=True)
class ModuleTarget:
    """The base weight one LoRA module changes.

    Attributes:
        component: ``unet``, ``te1`` or ``te2``.
        sgm_key: single-file key of the weight tensor that changes.
        diffusers_key: the weight's key inside the diffusers component.
        shape: shape of the weight the module's delta must have (the slice shape for q/k/v
            of OpenCLIP-bigG).
        part: ``(index, count)`` row block of ``sgm_key`` for fused q/k/v, else ``None``.
        block: the block the module sits in, for per-block reports (``input_blocks.4``).
    """

    component: Component
    sgm_key: str
    diffusers_key: str
    shape: tuple[int, ...]
    part: tuple[int, int] | None
    block: str

    @property
    def diffusers_module(self) -> str:
        return module_of(self.diffusers_key)

    @property
    def sgm_module(self) -> str:
        return module_of(self.sgm_key)


class TargetIndex:
    """Look-up from (component, module name in any known spelling) to :class:`ModuleTarget`.

    :attr:`targets` lists the weights trainers adapt (linears, convs, bigG's q/k/v slices); the
    look-up also resolves every other weight tensor of the UNet and text encoders stored alike in
    both layouts (norm weights, token/position embeddings...), so full diffs and LoRAs on them apply.
    """

    def __init__(self, table: LayoutTable):
        self._index: dict[tuple[Component, str], ModuleTarget] = {}
        self.targets: list[ModuleTarget] = []
        for r in table.rows:
            if r.diffusers is None or not r.diffusers.endswith(".weight") or len(r.diffusers_shape) < 2:
                continue
            if r.component == "vae" or r.transform == "transpose" or "embedding" in r.sgm:
                continue
            dmod = module_of(r.diffusers)
            if r.component in ("te1", "te2") and not dmod.endswith(_TE_MODULE_SUFFIXES):
                continue
            target = ModuleTarget(r.component, r.sgm_key, r.diffusers, r.diffusers_shape, r.part, _block_of(r.component, r.sgm))
            self.targets.append(target)
            names = {dmod}
            if r.transform != "slice":
                names.add(module_of(r.sgm))
            for n in names:
                self._index[(r.component, n)] = target
                self._index[(r.component, n.replace(".", "_"))] = target
        # Every other weight tensor is a target too (norms, embeddings...), for look-ups only:
        # ``targets`` stays the set trainers adapt. Transposed and sliced tensors need their own rule.
        for r in table.rows:
            if r.diffusers is None or not r.diffusers.endswith(".weight") or r.component == "vae":
                continue
            if r.transform != "rename":
                continue
            dmod = module_of(r.diffusers)
            if (r.component, dmod) in self._index:
                continue
            target = ModuleTarget(r.component, r.sgm_key, r.diffusers, r.diffusers_shape, None, _block_of(r.component, r.sgm))
            names = {dmod} | ({module_of(r.sgm)} if r.sgm.endswith(".weight") else set())
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

        Names a weight SDXL does not have (a ``conv_shortcut`` on a resnet whose input and output
        widths are equal, CLIP-L's ``text_projection``) or one this index does not target yet
        (OpenCLIP-bigG's ``text_projection``, stored transposed in the SGM layout).
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
        if name.endswith("text_projection"):
            if component == "te1":
                return "CLIP-L (te1) has no text_projection: only OpenCLIP-bigG (te2) has one"
            return "OpenCLIP-bigG's text_projection (transposed between the SGM and diffusers layouts) is not a target yet"
        return None
        if name.endswith(f"text{sep}projection") or leaf == "text_projection":
            if component == "te1":
                return "CLIP-L (te1) has no text_projection: only OpenCLIP-bigG (te2) has one"
            return "OpenCLIP-bigG's text_projection (transposed between the SGM and diffusers layouts) is not a target yet"
        if any(name.endswith(f"{e}{sep}embedding") for e in ("token", "position")):
            return "the text encoders' token and position embeddings are not targets yet"
        return None


def _block_of(component: Component, sgm: str) -> str:
    parts = sgm.split(".")
    if component == "unet":
        if parts[0] in ("input_blocks", "output_blocks"):
            return ".".join(parts[:2])
        return parts[0]
    if component == "te1":
        return ".".join(parts[:4]) if parts[:3] == ["text_model", "encoder", "layers"] else parts[0]
    return ".".join(parts[:3]) if parts[:2] == ["transformer", "resblocks"] else parts[0]
