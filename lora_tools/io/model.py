"""Read a base model in any layout we accept, addressed in the single-file (SGM) key space.

A base can be a single-file SGM checkpoint (full or UNet only), a standalone diffusers UNet
file, or a diffusers pipeline folder (sharded and variant files too). Whatever the layout,
:class:`ModelSource` offers the same view: SGM keys in reading order, their dtype and shape,
and one tensor at a time (raw bytes where the layouts agree byte for byte).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lora_tools.errors import Hint, InvalidFileError, KeyMismatchError, UnsupportedModelError
from lora_tools.io.diffusers_folder import component_weight_files
from lora_tools.io.fp8 import SCALE_SUFFIX, Fp8Layout, dequantize, is_fp8_extra, layout_of, scale_key
from lora_tools.io.remote import as_path
from lora_tools.io.safetensors import SafetensorsHeader, TensorFile, read_header
from lora_tools.layouts.detect import CheckpointKind, detect_checkpoint
from lora_tools.layouts.sdxl import SDXLConfig, config_from_shapes, to_diffusers, to_sgm
from lora_tools.layouts.table import DIFFUSERS_FOLDERS, SGM_PREFIXES, Component, KeyMap

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TensorRef:
    """Where one SGM-keyed tensor of the base lives."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    rows: tuple[KeyMap, ...]  # layout rows for this key ((): a key outside the layout table)
    raw_ok: bool  # bytes in the file are exactly the SGM tensor's bytes


class ModelSource:
    """A base model, read one tensor at a time in SGM key space."""

    def __init__(self, path: Path, layout: str, kind: CheckpointKind, cfg: SDXLConfig, metadata: dict[str, str],
                 refs: list[TensorRef], files: dict[str, SafetensorsHeader], where: dict[str, tuple[str, str]]):
        self.path = path
        self.layout = layout
        self.kind = kind
        self.cfg = cfg
        self.metadata = metadata
        self.refs = refs
        self._by_key = {r.key: r for r in refs}
        self._headers = files
        self._where = where  # diffusers key (component-qualified) -> (file, key in file)
        self._files: dict[str, TensorFile] = {}
        self.fp8: Fp8Layout | None = None  # an fp8 base (lora_tools.io.fp8): its weights are read dequantised
        self.fp8_scales: dict[str, float | None] = {}  # fp8 weight key -> its scale_weight (None: plain)

    @property
    def components(self) -> tuple[Component, ...]:
        return self.kind.components

    def headers(self) -> list[SafetensorsHeader]:
        """The headers of every file the model is read from."""
        return list(self._headers.values())

    def ref(self, key: str) -> TensorRef:
        return self._by_key[key]

    def __contains__(self, key: str) -> bool:
        return key in self._by_key

    def total_bytes(self) -> int:
        return sum(r.nbytes for r in self.refs)

    def _file(self, name: str) -> TensorFile:
        f = self._files.get(name)
        if f is None:
            f = self._files[name] = TensorFile(name, self._headers[name])
        return f

    def read_raw(self, ref: TensorRef, into: bytearray | memoryview | None = None) -> bytearray | memoryview:
        """The SGM tensor's bytes (only where ``ref.raw_ok``), optionally into a given buffer."""
        if self.layout == "sgm":
            f, key = self._file(str(self.path)), ref.key
        else:
            row = ref.rows[0]
            fname, key = self._where[f"{row.component}:{row.diffusers}"]
            f = self._file(fname)
        buf = into if into is not None else bytearray(ref.nbytes)
        f.read_into(key, buf)
        return buf

    def span(self, ref: TensorRef) -> tuple[int, int] | None:
        """Where a single file holds ``ref``'s bytes as they are (data-section offsets), or ``None`` (a
        folder's tensors, values that move)."""
        if self.layout != "sgm" or not ref.raw_ok:
            return None
        info = self._headers[str(self.path)].tensors[ref.key]
        return info.begin, info.end

    def read_span(self, refs: Sequence[TensorRef], into: memoryview) -> memoryview:
        """The bytes of tensors adjacent in a single file (each :meth:`span` following the last), in one read."""
        first = self.span(refs[0])
        assert first is not None
        self._file(str(self.path)).read_range(first[0], into, f"{refs[0].key}..{refs[-1].key}")
        return into

    def read(self, ref: TensorRef) -> torch.Tensor:
        """The SGM tensor (a fresh tensor owning its memory)."""
        from lora_tools.io.safetensors import bytes_to_tensor

        if self.layout == "sgm":
            f = self._file(str(self.path))
            t = bytes_to_tensor(f.read_bytes(ref.key), f.info(ref.key))
            return dequantize(t, self.fp8_scales[ref.key]) if ref.key in self.fp8_scales else t

        def get(row: KeyMap) -> torch.Tensor:
            fname, fkey = self._where[f"{row.component}:{row.diffusers}"]
            f = self._file(fname)
            t = bytes_to_tensor(f.read_bytes(fkey), f.info(fkey))
            return dequantize(t, self.fp8_scales[fkey]) if fkey in self.fp8_scales else t

        return to_sgm(list(ref.rows), get)

    def component_tensors(self, component: Component) -> Iterator[tuple[str, torch.Tensor]]:
        """The diffusers tensors of one component, one at a time, in reading order: ``(diffusers key, tensor)``.

        Each single-file tensor is read once (fp8 weights dequantised, see :meth:`read`) and becomes the
        diffusers tensors of its rows (OpenCLIP's fused q/k/v gives three); nothing else of the model is
        held, so a caller that puts each tensor into its module as it comes holds one copy of the weights.
        """
        for ref in self.refs:
            rows = [r for r in ref.rows if r.component == component and r.diffusers is not None]
            if not rows:
                continue
            t = self.read(ref)
            for row in rows:
                assert row.diffusers is not None
                yield row.diffusers, to_diffusers(row, t)
            del t

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __enter__(self) -> ModelSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_model(path: str | Path, *, variant: str | None = None) -> ModelSource:
    """Open a base model: SGM single file, diffusers UNet file or diffusers folder.

    Raises:
        InvalidFileError: not a readable model file.
        UnsupportedModelError: a model we understand but do not support (SD1.x, refiner, ...).
    """
    path = as_path(path)
    if path.is_dir():
        if (path / "model_index.json").exists() or (path / "unet").is_dir():
            return _open_diffusers_folder(path, variant)
        raise InvalidFileError(f"'{path}' is a directory but not a diffusers model folder (no model_index.json or unet/).")
    header = read_header(path)
    shapes = {k: t.shape for k, t in header.tensors.items()}
    kind = detect_checkpoint(shapes)
    if kind.layout == "unknown" and kind.architecture == "unknown":
        lora = _looks_like_lora(shapes)
        raise UnsupportedModelError(
            f"'{path}' is not an SDXL checkpoint: its keys match no known layout (first key: {next(iter(shapes), '-')})."
            + (" It looks like a LoRA." if lora else ""),
            hint=Hint("lora", "to apply it as a LoRA", "PATH") if lora else None,
        )
    if kind.layout == "diffusers-unet":
        return _from_diffusers_files(path, kind, {"unet": [header]}, header.metadata)
    cfg = config_from_shapes(shapes, kind.components) if kind.architecture in ("sdxl-base", "sdxl-inpaint") else SDXLConfig()
    table = cfg.table
    refs = []
    # Read in file order: sequential I/O, and the output can keep the base's order.
    for info in sorted(header.tensors.values(), key=lambda t: t.begin):
        rows = tuple(table.by_sgm_key.get(info.name, ()))
        refs.append(TensorRef(info.name, info.dtype, info.shape, info.nbytes, rows, True))
    model = ModelSource(path, "sgm", kind, cfg, dict(header.metadata), refs, {str(path): header}, {})
    if any(t.dtype in ("F8_E4M3", "F8_E5M2") for t in header.tensors.values()):
        read_fp8_base(model, header)
    return model


def read_fp8_base(model: ModelSource, header: SafetensorsHeader) -> None:
    """Make an fp8 single file read as the weights it stands for: each fp8 weight becomes an fp32 tensor
    (``weight * scale_weight``, as ComfyUI's comfy/ops.py uses it), the ``scale_weight`` and ``scaled_fp8``
    tensors are dropped from the model's tensors (see :mod:`lora_tools.io.fp8`)."""
    from dataclasses import replace

    with TensorFile(model.path, header) as f:
        scales = {k: float(f.tensor(k).float().reshape(-1)[0]) for k in header.tensors if k.endswith("." + SCALE_SUFFIX)}
    refs = []
    for r in model.refs:
        if is_fp8_extra(r.key):
            continue
        if r.dtype in ("F8_E4M3", "F8_E5M2"):
            model.fp8_scales[r.key] = scales.get(scale_key(r.key)) if r.key.endswith(".weight") else None
            r = replace(r, dtype="F32", nbytes=r.nbytes * 4, raw_ok=False)
        refs.append(r)
    model.fp8 = layout_of({k: t.dtype for k, t in header.tensors.items()}, scales)
    model.refs = refs
    model._by_key = {r.key: r for r in refs}


def _looks_like_lora(shapes: dict[str, tuple[int, ...]]) -> bool:
    return any(k.endswith(("lora_down.weight", "lora_A.weight", ".alpha", "hada_w1_a")) for k in shapes)


def _open_diffusers_folder(path: Path, variant: str | None) -> ModelSource:
    headers: dict[Component, list[SafetensorsHeader]] = {}
    for comp in DIFFUSERS_FOLDERS:
        files = component_weight_files(path, comp, variant=variant)
        if files:
            headers[comp] = [read_header(f) for f in files]
    if "unet" not in headers:
        raise InvalidFileError(f"'{path}' has no unet/*.safetensors weights (pickled .bin weights are not read).")
    shapes = {k: t.shape for h in headers["unet"] for k, t in h.tensors.items()}
    kind = detect_checkpoint(shapes)
    kind = CheckpointKind("sgm", kind.architecture, tuple(c for c in ("unet", "te1", "te2", "vae") if c in headers),
                          kind.prediction, kind.markers)
    return _from_diffusers_files(path, kind, headers, {}, layout="diffusers-folder")


def _from_diffusers_files(path: Path, kind: CheckpointKind, headers: dict[Component, list[SafetensorsHeader]],
                          metadata: dict[str, str], layout: str = "diffusers-unet") -> ModelSource:
    if kind.architecture != "sdxl-base" and kind.architecture != "sdxl-inpaint":
        raise UnsupportedModelError(f"'{path}' is not supported: {kind.why_unsupported()}.")
    where: dict[str, tuple[str, str]] = {}
    shapes_by_comp: dict[Component, dict[str, tuple[int, ...]]] = {}
    files: dict[str, SafetensorsHeader] = {}
    for comp, hs in headers.items():
        shapes_by_comp[comp] = {}
        for h in hs:
            files[str(h.path)] = h
            for k, t in h.tensors.items():
                if comp == "unet" and is_fp8_extra(k):  # scaled fp8: read with its weight (read_fp8_unet)
                    continue
                name = k
                if comp == "te1" and not k.startswith("text_model."):
                    name = "text_model." + k  # transformers >= 5 saves CLIPTextModel without the prefix
                where[f"{comp}:{name}"] = (str(h.path), k)
                shapes_by_comp[comp][name] = t.shape
    cfg = _config_from_diffusers(path, shapes_by_comp)
    table = cfg.table
    refs: list[TensorRef] = []
    for comp in ("unet", "te1", "te2", "vae"):
        if comp not in headers:
            continue
        rows = table.component_rows(comp)
        want = {r.diffusers for r in rows if r.diffusers}
        have = set(shapes_by_comp[comp]) - {"text_model.embeddings.position_ids"}
        if want != have:
            missing, extra = sorted(want - have), sorted(have - want)
            raise KeyMismatchError(
                f"'{path}' {DIFFUSERS_FOLDERS[comp]} does not match the SDXL layout: {len(missing)} missing, {len(extra)} "
                f"unknown (first: {(missing or extra)[0]})."
            )
        groups: dict[str, list[KeyMap]] = {}
        for r in rows:
            if r.diffusers is not None:
                groups.setdefault(r.sgm_key, []).append(r)
        for sgm_key, group in groups.items():
            first = group[0]
            fname, fkey = where[f"{comp}:{first.diffusers}"]
            info = files[fname].tensors[fkey]
            nbytes = info.nbytes * len(group)
            raw_ok = first.keeps_values
            refs.append(TensorRef(sgm_key, info.dtype, first.shape, nbytes, tuple(group), raw_ok))
    md = dict(metadata) if layout == "diffusers-unet" else {}
    if layout == "diffusers-unet":
        md = dict(headers["unet"][0].metadata)
    model = ModelSource(path, layout, kind, cfg, md, refs, files, where)
    if any(t.dtype in ("F8_E4M3", "F8_E5M2") for h in headers["unet"] for t in h.tensors.values()):
        read_fp8_unet(model, headers["unet"])
    return model


def read_fp8_unet(model: ModelSource, headers: list[SafetensorsHeader]) -> None:
    """:func:`read_fp8_base` for a diffusers-layout UNet (standalone file or a folder's unet/): its fp8
    weights read as ``weight * scale_weight`` in fp32."""
    from dataclasses import replace

    scales: dict[str, float] = {}
    for h in headers:
        with TensorFile(h.path, h) as f:
            scales |= {k: float(f.tensor(k).float().reshape(-1)[0]) for k in h.tensors if k.endswith("." + SCALE_SUFFIX)}
    refs = []
    for r in model.refs:
        if r.dtype in ("F8_E4M3", "F8_E5M2") and r.rows and r.rows[0].component == "unet":
            for row in r.rows:
                _, fkey = model._where[f"unet:{row.diffusers}"]
                model.fp8_scales[fkey] = scales.get(scale_key(fkey)) if fkey.endswith(".weight") else None
            r = replace(r, dtype="F32", nbytes=r.nbytes * 4, raw_ok=False)
        refs.append(r)
    model.fp8 = layout_of({k: t.dtype for h in headers for k, t in h.tensors.items()}, scales)
    model.refs = refs
    model._by_key = {r.key: r for r in refs}


def _config_from_diffusers(path: Path, shapes_by_comp: dict[Component, dict[str, tuple[int, ...]]]) -> SDXLConfig:
    """Rebuild the SGM shapes of each component from its diffusers shapes, then read the config."""
    from lora_tools.layouts.sdxl import FULL, TINY

    sgm_shapes: dict[str, tuple[int, ...]] = {}
    for candidate in (FULL, TINY):
        for comp, shapes in shapes_by_comp.items():
            for r in candidate.table.component_rows(comp):
                if r.diffusers in shapes and shapes[r.diffusers] == r.diffusers_shape:
                    sgm_shapes.setdefault(r.sgm_key, r.shape)
    unet_shapes = _unet_sgm_shapes(shapes_by_comp.get("unet", {}))
    sgm_shapes.update(unet_shapes)
    try:
        return config_from_shapes(sgm_shapes, tuple(shapes_by_comp))
    except KeyError as e:
        raise UnsupportedModelError(f"'{path}' does not have the SDXL block structure (missing {e}).") from e


def _unet_sgm_shapes(diffusers_shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """SGM keys with shapes for the few UNet tensors the config reader needs."""
    p = SGM_PREFIXES["unet"]
    out: dict[str, tuple[int, ...]] = {}
    simple = {"conv_in.weight": "input_blocks.0.0.weight", "conv_out.weight": "out.2.weight",
              "add_embedding.linear_1.weight": "label_emb.0.0.weight"}
    for d, sgm in simple.items():
        if d in diffusers_shapes:
            out[p + sgm] = diffusers_shapes[d]
    level = 0
    while f"down_blocks.{level}.resnets.0.conv1.weight" in diffusers_shapes:
        idx = level * 3 + 1
        out[f"{p}input_blocks.{idx}.0.in_layers.2.weight"] = diffusers_shapes[f"down_blocks.{level}.resnets.0.conv1.weight"]
        for k, s in diffusers_shapes.items():
            stem = f"down_blocks.{level}.attentions.0.transformer_blocks."
            if k.startswith(stem):
                out[f"{p}input_blocks.{idx}.1.transformer_blocks.{k[len(stem):]}"] = s
        level += 1
    for k, s in diffusers_shapes.items():
        stem = "mid_block.attentions.0.transformer_blocks."
        if k.startswith(stem):
            out[f"{p}middle_block.1.transformer_blocks.{k[len(stem):]}"] = s
    return out
