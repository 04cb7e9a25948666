"""The streaming writer: exact safetensors files, atomic, through O_DIRECT or buffered writes."""

from __future__ import annotations

import hashlib

import pytest
import torch
from safetensors.torch import load_file

from lora_tools.errors import KeyMismatchError
from lora_tools.io.safetensors import StreamingWriter, TensorFile, TensorPlan, dtype_name, read_header


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {  # odd sizes, so the last O_DIRECT block is partial and the file must be truncated
        "a": torch.randn(1001, 777, generator=g).half(),
        "b.bias": torch.randn(3, generator=g),
        "c": torch.randint(0, 100, (5, 7), generator=g),
        "d": torch.randn(2048, 1031, generator=g),
        "scalar": torch.tensor(8.0),
    }


@pytest.mark.parametrize("direct", [True, False])
def test_written_file_is_exact_and_hashed(tmp_path, direct):
    tensors = _tensors()
    out = tmp_path / "out.safetensors"
    plans = [TensorPlan(k, dtype_name(v.dtype), tuple(v.shape)) for k, v in tensors.items()]
    with StreamingWriter(out, plans, {"format": "pt"}, hash=True, direct=direct) as w:
        for k, v in tensors.items():
            w.write(k, v)
        w.finalize()
    data = out.read_bytes()
    assert len(data) == w.total_bytes
    assert w.sha256 == hashlib.sha256(data).hexdigest()
    loaded = load_file(out)  # the reference reader agrees
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
    with TensorFile(out) as f:
        assert bytes(f.read_bytes("a")) == tensors["a"].numpy().tobytes()
    assert read_header(out).metadata == {"format": "pt"}
    assert [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]


def test_nothing_appears_until_finalize_and_errors_leave_nothing(tmp_path):
    out = tmp_path / "out.safetensors"
    plans = [TensorPlan("a", "F32", (2,)), TensorPlan("b", "F32", (2,))]
    with pytest.raises(KeyMismatchError, match="out of order"):
        with StreamingWriter(out, plans, direct=True) as w:
            w.write("a", torch.zeros(2))
            assert not out.exists() and len(list(tmp_path.iterdir())) == 1  # only the .partial file
            w.write("c", torch.zeros(2))
    assert list(tmp_path.iterdir()) == []


def test_incomplete_file_is_not_finalized(tmp_path):
    out = tmp_path / "out.safetensors"
    with StreamingWriter(out, [TensorPlan("a", "F32", (2,)), TensorPlan("b", "F32", (2,))]) as w:
        w.write("a", torch.zeros(2))
        with pytest.raises(KeyMismatchError, match="1 tensors not written"):
            w.finalize()
    assert list(tmp_path.iterdir()) == []


# --- Header rules: our verdict agrees with the safetensors library (safe_open is the oracle). ---

import json  # noqa: E402
import struct  # noqa: E402
from pathlib import Path  # noqa: E402

from safetensors import safe_open  # noqa: E402

from lora_tools.errors import InvalidFileError, UnsafeFileError  # noqa: E402


def _raw_file(path: Path, header: str | bytes, data: bytes = b"", length: int | None = None) -> Path:
    raw = header.encode() if isinstance(header, str) else header
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def _entries(**tensors: tuple[str, list[int], list[int]]) -> str:
    return json.dumps({k: {"dtype": d, "shape": s, "data_offsets": o} for k, (d, s, o) in tensors.items()})


def _reference_accepts(path: Path) -> bool:
    try:
        with safe_open(str(path), "pt") as f:
            f.keys()
        return True
    except Exception:  # noqa: BLE001 - the oracle refuses with several exception types
        return False


#: (case, header JSON, data bytes, header-length override, what our message says)
HEADER_CASES = [
    ("valid", _entries(a=("F32", [2], [0, 8]), b=("F16", [3], [8, 14])), b"\0" * 14, None, None),
    ("valid-any-key-order", _entries(b=("F16", [3], [8, 14]), a=("F32", [2], [0, 8])), b"\0" * 14, None, None),
    ("valid-padded-header", _entries(a=("F32", [2], [0, 8])) + "    ", b"\0" * 8, None, None),
    ("valid-empty", "{}", b"", None, None),
    ("valid-null-metadata", '{"__metadata__": null}', b"", None, None),
    ("valid-zero-size-tensor", _entries(z=("F32", [0, 4], [0, 0]), a=("F32", [1], [0, 4])), b"\0" * 4, None, None),
    ("valid-format-dtype-we-do-not-compute", _entries(c=("C64", [2], [0, 16])), b"\0" * 16, None, None),
    ("header-longer-than-file", _entries(a=("F32", [2], [0, 8])), b"\0" * 8, 10_000, "does not fit in a"),
    ("header-over-100MB", _entries(a=("F32", [2], [0, 8])), b"\0" * 8, 100_000_001, "over the format's limit"),
    ("not-utf8", b'{"a\xff": 1}', b"", None, "not UTF-8"),
    ("malformed-json", '{"a": {"dtype": "F32"', b"", None, "invalid JSON"),
    ("json-array", "[1, 2]", b"", None, "a JSON list, not an object"),
    ("trailing-garbage", "{} x", b"", None, "invalid JSON"),
    ("duplicate-keys", '{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
                       '"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}', b"\0" * 8, None,
     "key 'a' appears twice"),
    ("metadata-not-strings", '{"__metadata__": {"x": 1}}', b"", None, "__metadata__ must map strings to strings"),
    ("metadata-a-list", '{"__metadata__": ["x"]}', b"", None, "__metadata__ must map strings to strings"),
    ("unknown-dtype", _entries(a=("F13", [2], [0, 8])), b"\0" * 8, None, "unknown dtype 'F13'"),
    ("negative-dim", _entries(a=("F32", [-2], [0, 8])), b"\0" * 8, None, "not a list of non-negative integers"),
    ("float-dim", _entries(a=("F32", [2.0], [0, 8])), b"\0" * 8, None, "not a list of non-negative integers"),
    ("three-offsets", _entries(a=("F32", [2], [0, 8, 8])), b"\0" * 8, None, "not two non-negative integers"),
    ("no-shape", '{"a": {"dtype": "F32", "data_offsets": [0, 4]}}', b"\0" * 4, None, "has no shape"),
    ("end-before-begin", _entries(a=("F32", [0], [8, 0])), b"\0" * 8, None, "before it begins"),
    ("size-disagrees", _entries(a=("F32", [3], [0, 8])), b"\0" * 8, None, "needs 12 bytes, its offsets 0..8 span 8"),
    ("sub-byte-tensor", _entries(a=("F4", [3], [0, 1])), b"\0", None, "does not fill whole bytes"),
    ("overlap", _entries(a=("F32", [2], [0, 8]), b=("F32", [2], [4, 12])), b"\0" * 12, None, "overlaps tensor 'a'"),
    ("same-span-twice", _entries(a=("F32", [2], [0, 8]), b=("F32", [2], [0, 8])), b"\0" * 8, None, "overlaps"),
    ("gap", _entries(a=("F32", [2], [0, 8]), b=("F32", [2], [12, 20])), b"\0" * 20, None,
     "bytes 8..12 of the data section belong to no tensor"),
    ("not-from-zero", _entries(a=("F32", [2], [4, 12])), b"\0" * 12, None, "bytes 0..4 of the data section"),
    ("out-of-range", _entries(a=("F32", [2], [0, 8]), b=("F32", [2], [8, 16])), b"\0" * 12, None,
     "is truncated: tensor data needs 16 bytes, the file holds 12"),
    ("trailing-bytes", _entries(a=("F32", [2], [0, 8])), b"\0" * 9, None, "1 bytes after the last tensor's data"),
]


@pytest.mark.parametrize("case,header,data,length,message", HEADER_CASES, ids=[c[0] for c in HEADER_CASES])
def test_header_rules_agree_with_safetensors(tmp_path, case, header, data, length, message):
    path = _raw_file(tmp_path / f"{case}.safetensors", header, data, length)
    reference = _reference_accepts(path)
    if message is None:
        assert reference, "the oracle should accept this file"
        read_header(path)
    else:
        assert not reference, "the oracle should refuse this file"
        with pytest.raises(InvalidFileError) as e:
            read_header(path)
        text = str(e.value)
        assert text.startswith(f"'{path}' ") and message in text, text
        assert "\n" not in text


def test_identical_duplicate_entries_are_refused_though_serde_keeps_one(tmp_path):
    """Stricter than the oracle, on purpose: serde collapses a repeated key, we name it."""
    entry = '{"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}'
    path = _raw_file(tmp_path / "dup.safetensors", f'{{"a": {entry}, "a": {entry}}}', b"\0" * 4)
    assert _reference_accepts(path)
    with pytest.raises(InvalidFileError, match="key 'a' appears twice"):
        read_header(path)


def test_control_characters_in_names_are_escaped_in_messages(tmp_path):
    name = "a\x1b]0;pwned\x07\nrow"
    path = _raw_file(tmp_path / "esc.safetensors", _entries(**{name: ("F99", [1], [0, 4])}), b"\0" * 4)
    with pytest.raises(InvalidFileError) as e:
        read_header(path)
    assert "\x1b" not in str(e.value) and "\n" not in str(e.value) and "\\x1b]0;pwned" in str(e.value)


@pytest.mark.parametrize("legacy", [False, True])
def test_pytorch_pickle_under_safetensors_name(tmp_path, legacy):
    path = tmp_path / "model.safetensors"
    torch.save({"w": torch.zeros(2)}, path, _use_new_zipfile_serialization=not legacy)
    assert not _reference_accepts(path)
    with pytest.raises(UnsafeFileError, match="is a PyTorch pickle, not safetensors"):
        read_header(path)


def test_dtype_we_cannot_compute_is_a_clean_error_on_read(tmp_path):
    path = _raw_file(tmp_path / "c64.safetensors", _entries(c=("C64", [2], [0, 16])), b"\0" * 16)
    with TensorFile(path) as f, pytest.raises(InvalidFileError, match="C64, a dtype lora_tools cannot read"):
        f.tensor("c")


def test_a_header_length_that_starts_like_a_pickle_is_still_safetensors(tmp_path: Path) -> None:
    """A header of 0x280 bytes makes the file start with ``80 02``, a pickle's PROTO opcode."""
    import json
    import struct

    for pad in range(800):
        header = json.dumps({"__metadata__": {"pad": "x" * pad},
                             "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
        if len(header) == 0x280:
            break
    path = tmp_path / "looks-like-pickle.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0\0\0\0")
    assert path.read_bytes()[:2] == b"\x80\x02"
    assert read_header(path).keys() == ["a"]


@pytest.mark.parametrize("native", [True, False], ids=["C", "numpy"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_largest_magnitude_from_bits_equals_torch_aminmax(dtype: torch.dtype, native: bool,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The torch-free magnitude scan a plan runs on LoRA files (and a fusion's first fp8 scale): torch's own
    aminmax is the oracle, for the compiled pass over 16-bit values (lora_tools/io/_native.c) and numpy's."""
    import math

    from lora_tools.io import magnitudes
    from lora_tools.io.magnitudes import largest_magnitude
    from lora_tools.io.safetensors import dtype_name, tensor_to_bytes

    if not native:
        monkeypatch.setattr(magnitudes, "_native", None)
    elif magnitudes._native is None:
        pytest.skip("the compiled part is not built here (no C compiler)")

    g = torch.Generator().manual_seed(3)
    info = torch.finfo(dtype)
    cases = [torch.randn(1000, generator=g).to(dtype) * 7, -torch.rand(50, generator=g).to(dtype),
             torch.tensor([-0.0, 0.0], dtype=dtype), torch.tensor([info.tiny / 4, -info.tiny / 8], dtype=dtype),
             torch.tensor([info.max, -info.max, 1.0], dtype=dtype), torch.tensor([-3.5], dtype=dtype)]
    for t in cases:
        lo, hi = (v.item() for v in torch.aminmax(t))
        assert largest_magnitude(tensor_to_bytes(t), dtype_name(dtype)) == max(-lo, hi), t
        assert magnitudes.tensor_largest_magnitude(t) == max(-lo, hi), t  # the tensor's bits
        wide = t.repeat(3, 1)
        assert magnitudes.tensor_largest_magnitude(wide.t()) == max(-lo, hi), t  # not contiguous: aminmax
    for bad in (math.nan, math.inf, -math.inf):
        t = torch.randn(64, generator=g).to(dtype)
        t[17] = bad
        assert largest_magnitude(tensor_to_bytes(t), dtype_name(dtype)) == math.inf
        assert magnitudes.tensor_largest_magnitude(t) == math.inf
        assert magnitudes.tensor_largest_magnitude(t.repeat(2, 1).t()) == math.inf
    assert largest_magnitude(b"", dtype_name(dtype)) == 0.0
    assert largest_magnitude(bytes(4), "I32") is None  # not a float it reads: the caller asks torch
