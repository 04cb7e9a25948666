"""The bad-input matrix: every command that reads model files, on every kind of bad file.

Each case builds one bad input; each command puts it in the role it reads (``fuse`` both as the
base and as a ``--lora``). Every run must end with the exact one-line message and exit status of
the table, no traceback, nothing under the output name (no temp file either) and every input's
bytes and mtime unchanged.

Adding a command that reads files is one line in :data:`COMMANDS` (how it is invoked with the bad
file) plus its expected line in the cases it applies to; recipe cases (YAML bombs, ``!!python``
tags) go in :data:`CASES` like any other (see ``RECIPE CASES`` below).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import struct
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner

from lora_tools.cli import cli
from lora_tools.io.safetensors import load_tensors, save_tensors
from lora_tools.testing.synthetic_lora import make_lora, write_lora
from tests.reliability_helpers import RunAs, unprivileged

COUNTED = "bad_input_cases"  # the conftest summary hook counts the tests carrying this marker


@dataclass(frozen=True)
class Inputs:
    """The good files a command needs besides the bad one, and where its output would go."""

    base: Path
    lora: Path
    out: Path


#: command -> the argv that reads ``bad`` in that command's role (one line per command).
COMMANDS: dict[str, Callable[[Path, Inputs], list[str]]] = {
    "inspect": lambda bad, io: ["inspect", str(bad)],
    "check": lambda bad, io: ["check", str(bad)],
    "fuse-base": lambda bad, io: ["fuse", str(bad), "--lora", str(io.lora), "-o", str(io.out), "-q"],
    "fuse-lora": lambda bad, io: ["fuse", str(io.base), "--lora", str(bad), "-o", str(io.out), "-q"],
    "rescale": lambda bad, io: ["rescale", str(bad), "--strength", "0.5", "-o", str(io.out)],
    "resize": lambda bad, io: ["resize", str(bad), "--rank", "1", "-o", str(io.out)],
    "merge": lambda bad, io: ["merge", str(bad), str(io.lora), "-o", str(io.out)],
    "convert": lambda bad, io: ["convert", str(bad), "--to", "peft", "-o", str(io.out)],
    "extract": lambda bad, io: ["extract", str(bad), str(io.base), "--rank", "1", "-o", str(io.out)],
    "analyze": lambda bad, io: ["analyze", str(io.base), "--base", str(io.base), "--lora", str(bad)],
    "verify": lambda bad, io: ["verify", str(bad), "--steps", "1", "--size", "64x64", "--device", "cpu"],
    "run": lambda bad, io: ["run", str(bad)],
}
#: The commands that read ``bad`` as a model or LoRA file (``run`` reads it as a recipe).
MODEL_READERS = [c for c in COMMANDS if c != "run"]


@dataclass(frozen=True)
class Expect:
    """What one command must do with one bad input.

    ``line`` is the one stderr line, with ``{bad}``, ``{base}``, ``{lora}``, ``{out}`` standing
    for the paths. ``exit`` 0 with a ``Warning:`` line means the command goes on (and then
    ``extra`` argv, e.g. ``--dry-run``, keeps the matrix from writing models). ``xfail`` names
    the engineer's file where today's behaviour has to change.
    """

    line: str
    exit: int = 1
    extra: tuple[str, ...] = ()
    xfail: str | None = None


@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[Path, Inputs], Path]
    expect: Mapping[str, Expect] = field(default_factory=dict)


# --- builders: small crafted files --------------------------------------------------------------


def _raw(name: str, header: str | bytes, data: bytes = b"", length: int | None = None) -> Callable[[Path, Inputs], Path]:
    def build(d: Path, io: Inputs) -> Path:
        raw = header.encode() if isinstance(header, str) else header
        path = d / name
        path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
        return path
    return build


def _entries(*tensors: tuple[str, str, list[int], list[int]]) -> str:
    return json.dumps({k: {"dtype": dt, "shape": s, "data_offsets": o} for k, dt, s, o in tensors})


_K1 = "lora_unet_mid_block_attentions_0_proj_in.lora_down.weight"
_K2 = "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight"


def _bytes(name: str, data: bytes) -> Callable[[Path, Inputs], Path]:
    def build(d: Path, io: Inputs) -> Path:
        (d / name).write_bytes(data)
        return d / name
    return build


def _cut(keep: Callable[[bytes], int]) -> Callable[[Path, Inputs], Path]:
    """A copy of the good LoRA cut to ``keep(data)`` bytes."""
    def build(d: Path, io: Inputs) -> Path:
        data = io.lora.read_bytes()
        (d / "cut.safetensors").write_bytes(data[: keep(data)])
        return d / "cut.safetensors"
    return build


def _header_len(data: bytes) -> int:
    return struct.unpack("<Q", data[:8])[0]


def _directory(d: Path, io: Inputs) -> Path:
    (d / "folder.safetensors").mkdir()
    return d / "folder.safetensors"


def _missing(d: Path, io: Inputs) -> Path:
    return d / "missing.safetensors"


class _RunsCode:
    """Unpickling this creates a marker file: the test asserts it never appears."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def _code_pickle(name: str) -> Callable[[Path, Inputs], Path]:
    def build(d: Path, io: Inputs) -> Path:
        torch.save({"state_dict": {"w": torch.zeros(2)}, "payload": _RunsCode(d.parent / f"{d.name}-code-ran")}, d / name)
        return d / name
    return build


def _torch_zip(d: Path, io: Inputs) -> Path:
    torch.save(load_tensors(io.lora), d / "converted.safetensors")
    return d / "converted.safetensors"


def _kohya(name: str, modules: Mapping[str, tuple[tuple[int, ...], tuple[int, ...]]], fill: float = 0.0) -> Callable[[Path, Inputs], Path]:
    """A kohya LoRA: module -> (up shape, down shape)."""
    def build(d: Path, io: Inputs) -> Path:
        tensors = {}
        for m, (up, down) in modules.items():
            tensors[f"lora_unet_{m}.lora_down.weight"] = torch.full(down, fill)
            tensors[f"lora_unet_{m}.lora_up.weight"] = torch.full(up, fill)
            tensors[f"lora_unet_{m}.alpha"] = torch.tensor(1.0)
        return save_tensors(d / name, tensors)
    return build


def _peft(name: str, keys: Mapping[str, tuple[int, ...]]) -> Callable[[Path, Inputs], Path]:
    def build(d: Path, io: Inputs) -> Path:
        return save_tensors(d / name, {k: torch.zeros(s) for k, s in keys.items()})
    return build


def _bad_value(value: float) -> Callable[[Path, Inputs], Path]:
    def build(d: Path, io: Inputs) -> Path:
        tensors, meta = make_lora("tiny", rank=2)
        first = sorted(k for k in tensors if k.endswith("lora_up.weight"))[0]
        tensors[first][0, 0] = value
        return save_tensors(d / "nonfinite.safetensors", tensors, meta)
    return build


def _rank_mismatch(d: Path, io: Inputs) -> Path:
    tensors, meta = make_lora("tiny", rank=4)
    first = sorted(k for k in tensors if k.endswith("lora_down.weight"))[0]
    tensors[first] = tensors[first][:2].contiguous()
    return save_tensors(d / "rank.safetensors", tensors, meta)


def _misfit(algorithm: str, suffix: str, reshape: Callable[[tuple[int, ...]], tuple[int, ...]]) -> Callable[[Path, Inputs], Path]:
    """A LoRA of ``algorithm`` whose first ``suffix`` factor gets the shape ``reshape(shape)``."""
    def build(d: Path, io: Inputs) -> Path:
        tensors, meta = make_lora("tiny", algorithm=algorithm, targets="all", rank=2)  # type: ignore[arg-type]
        if algorithm == "lokr":  # the LyCORIS spelling of LoKr's w2 pair (lora/spelling.py writes hada_w2_*)
            tensors = {k.replace(".hada_w2_", ".lokr_w2_"): v for k, v in tensors.items()}
        first = sorted(k for k in tensors if k.endswith(suffix))[0]
        tensors[first] = torch.zeros(reshape(tuple(tensors[first].shape)))
        return save_tensors(d / f"{algorithm}.safetensors", tensors, meta)
    return build


def _wrong_width(d: Path, io: Inputs) -> Path:
    tensors, meta = make_lora("tiny", rank=2)
    first = sorted(k for k in tensors if k.endswith("lora_down.weight"))[0]
    tensors[first] = torch.zeros(2, tensors[first].shape[1] + 3)
    return save_tensors(d / "width.safetensors", tensors, meta)


def _base_variant(name: str, edit: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path, Inputs], Path]:
    def build(d: Path, io: Inputs) -> Path:
        tensors = load_tensors(io.base)
        edit(tensors)
        return save_tensors(d / name, tensors, {"format": "pt"})
    return build


def _refiner(t: dict[str, torch.Tensor]) -> None:
    key = "model.diffusion_model.label_emb.0.0.weight"
    t[key] = torch.zeros(t[key].shape[0], 2560, dtype=t[key].dtype)


def _inpaint(t: dict[str, torch.Tensor]) -> None:
    key = "model.diffusion_model.input_blocks.0.0.weight"
    w = t[key]
    t[key] = torch.zeros(w.shape[0], 9, *w.shape[2:], dtype=w.dtype)


def _vpred(t: dict[str, torch.Tensor]) -> None:
    t["v_pred"] = torch.zeros(0, dtype=torch.int64)


def _unreadable(d: Path, io: Inputs) -> Path:
    path = d / "locked.safetensors"
    shutil.copyfile(io.lora, path)
    path.chmod(0)
    return path


def _recipe(name: str, text: str) -> Callable[[Path, Inputs], Path]:
    """A recipe file; ``{base}``/``{lora}`` in ``text`` stand for the good inputs."""
    def build(d: Path, io: Inputs) -> Path:
        (d / name).write_text(text.format(base=io.base, lora=io.lora))
        return d / name
    return build


def _alias_bomb() -> str:
    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]")
    return "\n".join(["version: 1", *lines, "jobs: []"]).replace("{", "{{").replace("}", "}}") + "\n"


_RECIPE_HEAD = """version: 1
output_dir: out
inputs:
  base: {base}
  style: {lora}
"""


def _te_lora(d: Path, io: Inputs) -> Path:
    return write_lora(d / "with-te.safetensors", "tiny", rank=2, components=("unet", "te1", "te2"))


_LIGHTNING_NAME = "sdxl_lightning_4step_lora.safetensors"


def _named_like_lightning(d: Path, io: Inputs) -> Path:
    """A plain style LoRA (kohya SGM names, a few modules) under the Lightning LoRA's file name."""
    return Path(shutil.copyfile(io.lora, d / _LIGHTNING_NAME))


_MISLEADING = (f"Warning: '{_LIGHTNING_NAME}' is named like the Lightning 4-step LoRA, but its keys do not have that "
               "LoRA's signature: the name may be misleading.")


# --- the expected lines ---------------------------------------------------------------------------

def _same(line: str, **over: Expect) -> dict[str, Expect]:
    """The same line from every command (a header problem reads the same wherever it is found)."""
    return {c: over.get(c.replace("-", "_"), Expect(line)) for c in MODEL_READERS}


#: The commands that read ``bad`` as a LoRA and write a LoRA (or a report).
_LORA_OPS = ("rescale", "resize", "merge", "convert", "analyze")
_NAN_OP = ("Error: '{{bad}}' holds NaN or Inf values (first in "
           "'lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_k.lora_up.weight'): refusing to {verb} it.")
_CORRUPT = "Error: '{bad}' has a corrupt safetensors header: "
_RANK = ("Error: '{bad}': the factors of module 'down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_k' (unet): "
         "up (64, 4) has rank 4, down (2, 64) has rank 2.")
_TUCKER = ("Error: '{bad}': the factors of module 'conv_in' (unet): the Tucker mid (3, 2, 3, 3) does not chain up "
           "(32, 2, 1, 1) and down (2, 4, 1, 1) (need up[1] == mid[0], mid[1] == down[0]).")
_LOKR = ("Error: '{bad}': the factors of module 'add_embedding_linear_1' (unet): w2: a (64, 2) has rank 2, "
         "b (3, 40) has rank 3.")
_PICKLE = ("Error: '{bad}' is a PyTorch pickle, not safetensors; lora_tools never loads a pickle in place of a "
           "safetensors file (unpickling can run code). Convert it with a tool you trust.")
_SD1_HINT = "It looks like an SD1.x LoRA (768-wide cross-attention), which does not fit SDXL."
_SD2_HINT = "It looks like an SD2.x LoRA (1024-wide cross-attention), which does not fit SDXL."
_SD15_MODULES = ("unet:down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q, "
                 "unet:down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k")
_SD2_MODULES = "unet:down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k, unet:up_blocks_3_attentions_2_proj_out"
_FLUX = ("Error: '{bad}' is a Flux LoRA (first key: transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight), "
         "which does not fit SDXL.")

CASES: list[Case] = [
    Case("empty", _bytes("empty.safetensors", b""), _same("Error: '{bad}' is empty: not a safetensors file.")),
    Case("not-safetensors", _bytes("noise.safetensors", random.Random(0).randbytes(4096)),
         _same("Error: '{bad}' is not a valid safetensors file: header length 7106521602475165645 is over the "
               "format's limit of 100000000 bytes.")),
    Case("text-file", _bytes("readme.safetensors", b"version https://git-lfs.github.com/spec/v1\n"),
         _same("Error: '{bad}' is not a valid safetensors file: header length 2336927755350992246 is over the "
               "format's limit of 100000000 bytes.")),
    Case("truncated-header", _cut(lambda data: 8 + _header_len(data) // 2),
         _same("Error: '{bad}' is not a valid safetensors file: header length 166784 does not fit in a 83400-byte file.")),
    Case("truncated-data", _cut(lambda data: len(data) - 100),
         _same("Error: '{bad}' is truncated: tensor data needs 1003520 bytes, the file holds 1003420.")),
    Case("header-length-beyond-file", _raw("long.safetensors", _entries((_K1, "F32", [2], [0, 8])), b"\0" * 8, 5000),
         _same("Error: '{bad}' is not a valid safetensors file: header length 5000 does not fit in a 133-byte file.")),
    Case("malformed-json", _raw("json.safetensors", '{"' + _K1 + '": {"dtype": "F32"', b"\0" * 8),
         _same(_CORRUPT + "invalid JSON (Expecting ',' delimiter at byte 77).")),
    Case("not-utf8", _raw("utf8.safetensors", b'{"\xff\xfe": 1}'), _same(_CORRUPT + "not UTF-8 (byte 2).")),
    Case("overlapping-offsets", _raw("overlap.safetensors", _entries((_K1, "F32", [2, 2], [0, 16]),
                                                                      (_K2, "F32", [2, 2], [8, 24])), b"\0" * 24),
         _same(_CORRUPT + f"tensor '{_K2}' (bytes 8..24) overlaps tensor '{_K1}' (bytes 0..16).")),
    Case("offsets-out-of-range", _raw("range.safetensors", _entries((_K1, "F32", [2, 2], [0, 16]),
                                                                     (_K2, "F32", [2, 2], [16, 32])), b"\0" * 20),
         _same("Error: '{bad}' is truncated: tensor data needs 32 bytes, the file holds 20.")),
    Case("offsets-leave-a-gap", _raw("gap.safetensors", _entries((_K1, "F32", [2, 2], [0, 16]),
                                                                  (_K2, "F32", [2, 2], [20, 36])), b"\0" * 36),
         _same(_CORRUPT + f"bytes 16..20 of the data section belong to no tensor (a gap before tensor '{_K2}').")),
    Case("bytes-after-the-data", _raw("tail.safetensors", _entries((_K1, "F32", [2], [0, 8])), b"\0" * 12),
         _same(_CORRUPT + "4 bytes after the last tensor's data belong to no tensor.")),
    Case("size-disagrees-with-shape", _raw("size.safetensors", _entries((_K1, "F16", [2, 3], [0, 8])), b"\0" * 8),
         _same(_CORRUPT + f"tensor '{_K1}' (F16 [2, 3]) needs 12 bytes, its offsets 0..8 span 8.")),
    Case("unknown-dtype", _raw("dtype.safetensors", _entries((_K1, "F13", [2], [0, 8])), b"\0" * 8),
         _same(_CORRUPT + f"tensor '{_K1}' has unknown dtype 'F13'.")),
    Case("duplicate-keys", _raw("dup.safetensors", '{"%s": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '  # noqa: UP031 (JSON: % reads better than doubled braces)
                                                    '"%s": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}'
                                                    % (_K1, _K1), b"\0" * 8),
         _same(_CORRUPT + f"key '{_K1}' appears twice.")),
    Case("metadata-not-strings", _raw("meta.safetensors", '{"__metadata__": {"ss_network_dim": 4}}'),
         _same(_CORRUPT + "__metadata__ must map strings to strings.")),
    Case("control-characters-in-a-key", _raw("esc.safetensors", _entries(("x\x1b]0;owned\x07", "F99", [1], [0, 4])), b"\0" * 4),
         _same(_CORRUPT + "tensor 'x\\\\x1b]0;owned\\\\x07' has unknown dtype 'F99'.")),
    Case("a-directory", _directory, {
        "inspect": Expect("Error: '{bad}' is a directory without model_index.json: pass a .safetensors file, a .ckpt file or a diffusers pipeline folder."),
        "check": Expect("Error: '{bad}' is a directory, not a safetensors file."),
        "fuse-base": Expect("Error: '{bad}' is a directory but not a diffusers model folder (no model_index.json or unet/)."),
        "fuse-lora": Expect("Error: '{bad}' is a directory, not a file: name a .safetensors file inside it."),
        "extract": Expect("Error: '{bad}' is a directory but not a diffusers model folder (no model_index.json or unet/)."),
        "verify": Expect("Error: '{bad}' is a directory without model_index.json: not a diffusers pipeline folder."),
    } | {c: Expect("Error: '{bad}' is a directory: pass a .safetensors file (or a diffusers folder where a model is "
                   "expected).") for c in _LORA_OPS}),
    Case("a-missing-file", _missing, {
        "inspect": Expect("Error: '{bad}' does not exist."),
        "check": Expect("Error: '{bad}' does not exist."),
        "fuse-base": Expect("Error: '{bad}' does not exist."),
        "fuse-lora": Expect("Error: '{bad}' is not a file and not a hub reference (owner/repo/file.safetensors)."),
    } | {c: Expect("Error: '{bad}' does not exist.") for c in (*_LORA_OPS, "extract", "verify")}),
    Case("pickle-needing-code-ckpt", _code_pickle("evil.ckpt"), {
        c: Expect("Error: '{bad}' is a pickle that needs code execution to load (it calls exec); lora_tools never runs "
                  "untrusted pickles. Convert it to .safetensors with a tool you trust.")
        for c in ("inspect", "fuse-lora", *_LORA_OPS)} | {
        c: Expect(_PICKLE) for c in ("check", "fuse-base", "extract", "verify")}),
    Case("pickle-needing-code-as-safetensors", _code_pickle("evil.safetensors"),
         _same(_PICKLE)),
    Case("pytorch-zip-as-safetensors", _torch_zip,
         _same(_PICKLE)),
    # --- content that is valid safetensors but the wrong model or LoRA (check has no verdict on these) ---
    Case("sd15-lora", _kohya("sd15.safetensors", {
        "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": ((320, 2), (2, 320)),
        "down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": ((320, 2), (2, 768))}), {
        "inspect": Expect("Error: '{bad}' is a kohya LoRA that fits no SDXL model: none of its 2 modules has an SDXL target "
                          "(first: " + _SD15_MODULES + "). " + _SD1_HINT),
        "fuse-lora": Expect("Error: Cannot fuse: 2 of 2 modules of '{bad}' have no target in '{base}' (first: " + _SD15_MODULES
                            + "). " + _SD1_HINT + " Run 'loratool inspect {bad}'."),
    }),
    Case("sd2-lora", _kohya("sd2.safetensors", {
        "down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": ((320, 2), (2, 1024)),
        "up_blocks_3_attentions_2_proj_out": ((320, 2), (2, 320))}), {
        "inspect": Expect("Error: '{bad}' is a kohya LoRA that fits no SDXL model: none of its 2 modules has an SDXL target "
                          "(first: " + _SD2_MODULES + "). " + _SD2_HINT),
        "fuse-lora": Expect("Error: Cannot fuse: 2 of 2 modules of '{bad}' have no target in '{base}' (first: " + _SD2_MODULES
                            + "). " + _SD2_HINT + " Run 'loratool inspect {bad}'."),
    }),
    Case("flux-lora", _peft("flux.safetensors", {
        "transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": (2, 3072),
        "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": (3072, 2)}), {
        c: Expect(_FLUX) for c in ("inspect", "fuse-lora")}),
    Case("nan-in-a-lora", _bad_value(float("nan")), {
        c: Expect(_NAN_OP.format(verb=c.removesuffix("-lora"))) for c in ("fuse-lora", *_LORA_OPS)}),
    Case("inf-in-a-lora", _bad_value(float("inf")), {
        c: Expect(_NAN_OP.format(verb=c.removesuffix("-lora"))) for c in ("fuse-lora", *_LORA_OPS)}),
    Case("rank-mismatch", _rank_mismatch, {
        c: Expect(_RANK) for c in ("check", "fuse-lora", "inspect", *_LORA_OPS)}),
    Case("rank-mismatch-dry-run", _rank_mismatch, {"fuse-lora": Expect(_RANK, extra=("--dry-run",))}),
    Case("tucker-mid-misfit", _misfit("lora-tucker", "lora_mid.weight", lambda s: (s[0] + 1, *s[1:])), {
        c: Expect(_TUCKER) for c in ("check", "fuse-lora", *_LORA_OPS)}),
    Case("lokr-factor-misfit", _misfit("lokr", "lokr_w2_b", lambda s: (s[0] + 1, *s[1:])), {
        c: Expect(_LOKR) for c in ("check", "fuse-lora", *_LORA_OPS)}),
    Case("shapes-do-not-fit-the-base", _wrong_width, {
        "fuse-lora": Expect("Error: '{bad}': module 'down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_k' does not fit 'model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_k.weight' of '{base}' (LoRA gives 64x67, the weight is [64, 64])."),
    }),
    Case("a-lora-as-the-base", lambda d, io: Path(shutil.copyfile(io.lora, d / "style.safetensors")), {
        "fuse-base": Expect("Error: '{bad}' is not an SDXL checkpoint: its keys match no known layout (first key: "
                            "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight). It looks "
                            "like a LoRA; pass --lora PATH to apply it as a LoRA."),
    }),
    Case("a-checkpoint-as-a-lora", lambda d, io: Path(shutil.copyfile(io.base, d / "model.safetensors")), {
        c: Expect("Error: '{bad}' is not a LoRA in any known format (first key: model.diffusion_model.time_embed.0.weight): "
                  "it looks like a full checkpoint, not a LoRA.") for c in _LORA_OPS} | {
        "fuse-lora": Expect("Error: '{bad}' is not a LoRA in any known format (first key: model.diffusion_model.time_embed.0.weight): "
                            "it looks like a full checkpoint, not a LoRA."),
    }),
    Case("refiner-unet", _base_variant("refiner.safetensors", _refiner), {
        "fuse-base": Expect("Error: '{bad}' is not supported: the SDXL refiner has a different UNet (1280-wide context, 384 base channels) that SDXL LoRAs do not fit."),
    }),
    Case("inpaint-unet", _base_variant("inpaint.safetensors", _inpaint), {
        "fuse-base": Expect("Warning: '{bad}' is an SDXL inpainting model (9-channel input); SDXL LoRAs are usually "
                            "trained on the 4-channel SDXL base", exit=0, extra=("--dry-run",)),
    }),
    Case("v-prediction-checkpoint", _base_variant("vpred.safetensors", _vpred), {
        "fuse-base": Expect("Warning: '{bad}' is a v_prediction model", exit=0, extra=("--dry-run",)),
    }),
    Case("text-encoder-lora-on-a-unet-only-base", _te_lora, {
        "fuse-lora": Expect("Error: Cannot fuse: 264 modules of '{bad}' change te1, te2, but the base has no text encoders "
                            "('{base}' holds unet); pass --allow-unmatched to skip them."),
    }),
    Case("text-encoder-lora-on-a-unet-only-base-allowed", _te_lora, {
        "fuse-lora": Expect("Warning: skipping 264 unmatched modules of '{bad}' (the base has no text encoders)",
                            exit=0, extra=("--allow-unmatched", "--dry-run")),
    }),
    Case("named-like-lightning-without-its-signature", _named_like_lightning, {
        "fuse-lora": Expect(_MISLEADING + " Fusing it as a plain LoRA, not as Lightning 4-step.", exit=0,
                            extra=("--dry-run",)),
    }),
    Case("hub-reference-leaving-its-repo", lambda d, io: Path("owner/repo/../../evil.safetensors"), {
        "fuse-lora": Expect("Error: '{bad}' is not a file and not a hub reference (owner/repo/file.safetensors)."),
    }),
    # RECIPE CASES: ``run`` reads ``bad`` as the recipe.
    Case("recipe-yaml-alias-bomb", _recipe("bomb.yaml", _alias_bomb()), {
        "run": Expect("Error: {bad}:2:22: the document expands to more than 20000 values (aliases nested too deep?): "
                      "refusing it"),
    }),
    Case("recipe-python-tag", _recipe("tag.yaml", "version: 1\njobs:\n  - fuse: !!python/object/apply:os.system [\"touch pwned\"]\n"), {
        "run": Expect("Error: {bad}:3:11: tag '!!python/object/apply:os.system' is not allowed: recipes are plain YAML "
                      "(mappings, lists, strings, numbers)"),
    }),
    Case("recipe-name-leaving-the-output-folder", _recipe("escape.yaml", _RECIPE_HEAD + """matrix:
  name: [ok, ../../evil]
jobs:
  - fuse:
      base: base
      loras: [{{lora: style}}]
      output: ${{name}}.safetensors
"""), {
        "run": Expect("Error: {bad}:12:15: jobs[0].fuse.output: '../../evil.safetensors' leaves the output folder "
                      "'{work}/out' (job 'fuse0-.._.._evil')"),
    }),
]

# The unreadable file needs a user that root's file permissions apply to: run as `nobody`.
_LOCKED = "Error: '{bad}' cannot be read: Permission denied."
UNREADABLE = Case("an-unreadable-file", _unreadable, _same(_LOCKED))


def _params() -> list[object]:
    """Every case x command; the first case of each command is the default selection's smoke row, the rest
    of the matrix runs in the full selection (``-m ""``)."""
    params = []
    smoke: set[str] = set()
    for case in CASES:
        for command, expect in case.expect.items():
            marks = [getattr(pytest.mark, COUNTED), pytest.mark.slow if command in smoke else pytest.mark.smoke]
            smoke.add(command)
            if expect.xfail:
                marks.append(pytest.mark.xfail(strict=True, reason=expect.xfail))
            params.append(pytest.param(case, command, expect, id=f"{case.id}-{command}", marks=marks))
    return params


# --- the runs -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def good(tiny_unet_inputs: SimpleNamespace) -> tuple[Path, Path]:
    """A tiny UNet-only SDXL base and a LoRA that fits it, built once."""
    return tiny_unet_inputs.base, tiny_unet_inputs.lora


def _state(paths: list[Path]) -> dict[str, tuple[object, ...]]:
    """Size, mtime, ctime (any write moves it) and, for files under 8 MB, the sha256 of each path."""
    out: dict[str, tuple[object, ...]] = {}
    for p in paths:
        if not os.path.lexists(p):
            continue
        st = p.lstat()
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() and st.st_size < 8 << 20 and os.access(p, os.R_OK) and st.st_mode & 0o444 else None
        out[str(p)] = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_mode, digest)
    return out


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _assert_clean(result_stdout: str, stderr: str, code: int, expect: Expect, paths: Mapping[str, Path]) -> None:
    line = expect.line.format(**{k: str(v) for k, v in paths.items()})
    assert "Traceback" not in stderr, stderr
    assert code == expect.exit, (code, stderr)
    if expect.exit == 0:
        assert stderr.splitlines()[0].startswith(line), stderr
    else:
        assert stderr.splitlines() == [line], stderr
        assert "Error" not in result_stdout


@pytest.mark.parametrize("case,command,expect", _params())
def test_bad_input(case: Case, command: str, expect: Expect, good: tuple[Path, Path], tmp_path: Path) -> None:
    base, lora = good
    work = tmp_path / "work"
    work.mkdir()
    io = Inputs(base, lora, work / "out.safetensors")
    bad = case.build(work, io)
    inputs_before = _state([base, lora, bad])
    listing_before = _listing(work)
    result = CliRunner().invoke(cli, [*COMMANDS[command](bad, io), *expect.extra])
    _assert_clean(result.stdout, result.stderr, result.exit_code, expect,
                  {"bad": bad, "base": base, "lora": lora, "out": io.out, "work": work})
    assert _listing(work) == listing_before, "an output or temp file was left behind"
    assert not io.out.exists()
    assert _state([base, lora, bad]) == inputs_before, "an input changed"
    assert not (tmp_path / "work-code-ran").exists(), "the pickle's code ran"


@pytest.mark.parametrize("command", [
    pytest.param(c, id=f"{UNREADABLE.id}-{c}", marks=[getattr(pytest.mark, COUNTED)] + (
        [pytest.mark.xfail(strict=True, reason=e.xfail)] if e.xfail else []))
    for c, e in UNREADABLE.expect.items()])
def test_unreadable_file(command: str, good: tuple[Path, Path], run_as: RunAs) -> None:
    ids = unprivileged()  # a plain user: file permissions apply already; root drops to `nobody`
    if ids is None:
        pytest.skip("runs as root and there is no 'nobody' user to drop to: root reads any file")
    uid, gid = ids
    work = Path(tempfile.mkdtemp(prefix="loratool-unreadable-"))
    try:
        work.chmod(0o777)  # the output folder is writable to the dropped user: only the input is not readable
        base, lora = (Path(shutil.copyfile(p, work / f"good-{p.name}")) for p in good)
        for p in (base, lora):
            p.chmod(0o644)
        io = Inputs(base, lora, work / "out.safetensors")
        bad = UNREADABLE.build(work, io)
        # The command runs in a forked child that drops to `nobody` first. The interpreter's own
        # files may sit where `nobody` cannot read (/root/.pyenv), so the parent first runs the same
        # command on an empty file, which fails at the same read and imports all it needs.
        empty = work / "empty.safetensors"
        empty.write_bytes(b"")
        CliRunner().invoke(cli, COMMANDS[command](empty, io))
        empty.unlink()
        before, listing_before = _state([base, lora, bad]), _listing(work)
        code, stdout, stderr = run_as(uid, gid, COMMANDS[command](bad, io))
        _assert_clean(stdout, stderr, code, UNREADABLE.expect[command],
                      {"bad": bad, "base": base, "lora": lora, "out": io.out, "work": work})
        assert _listing(work) == listing_before and _state([base, lora, bad]) == before
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --- a LoRA named like Lightning: its keys decide ------------------------------------------------

@pytest.mark.parametrize("shaped", [False, True], ids=["plain-keys", "lightning-keys"])
def test_lora_named_like_lightning_is_fused_as_lightning_only_with_its_signature(
        shaped: bool, good: tuple[Path, Path], tmp_path: Path) -> None:
    """``fuse --lora sdxl_lightning_4step_lora.safetensors``: with plain LoRA keys, inspect's warning
    before the fuse and a plain fuse (no Lightning name, record or sampler advice); with the
    Lightning key signature, a Lightning fuse without a warning (the name is not distrusted)."""
    from lora_tools.io.safetensors import read_header
    from lora_tools.provenance import read_record

    base = Path(shutil.copyfile(good[0], tmp_path / "base.safetensors"))
    if shaped:
        lora = write_lora(tmp_path / _LIGHTNING_NAME, "tiny", fmt="kohya-diffusers", targets="lightning",
                          components=("unet",), rank=8, alpha=4.0, dtype="fp16", seed=7)
    else:
        lora = Path(shutil.copyfile(good[1], tmp_path / _LIGHTNING_NAME))
    inspected = CliRunner().invoke(cli, ["inspect", str(lora)])
    assert inspected.exit_code == 0, inspected.stderr
    result = CliRunner().invoke(cli, ["fuse", str(base), "--lora", str(lora)])
    assert result.exit_code == 0, result.stderr
    written = sorted(p.name for p in tmp_path.iterdir() if p not in (base, lora))
    assert len(written) == 1, written
    record = read_record(read_header(tmp_path / written[0]).metadata)
    (source,) = [s for s in record["sources"] if s["role"] == "lora"]
    if shaped:
        assert result.stderr == ""
        assert written == ["base-lightning-4step.safetensors"]
        assert source["preset"] == "lightning-4step" and record["preset"] == "lightning-4step"
        assert record["lightning_steps"] == 4 and record["sampler"] is not None
        assert "Use it with:" in result.stdout
        assert "may be misleading" not in inspected.stdout
    else:
        warning = _MISLEADING.removeprefix("Warning: ")
        assert result.stderr.splitlines() == [f"Warning: {warning} Fusing it as a plain LoRA, not as Lightning 4-step."]
        assert warning in " ".join(inspected.stdout.split())  # the words inspect uses
        assert "lightning-4step" not in written[0] and "preset" not in source
        assert record.get("preset") is None and record.get("lightning_steps") is None
        assert record.get("sampler") is None
        assert "Use it with:" not in result.stdout and "sgm_uniform" not in result.stdout
