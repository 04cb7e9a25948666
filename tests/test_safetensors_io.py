"""The streaming writer: exact safetensors files, atomic, through O_DIRECT or buffered writes."""

from __future__ import annotations

import hashlib

import pytest
import torch
from safetensors.torch import load_file

from lora_tools.errors import KeyMismatchError
from lora_tools.safetensors_io import StreamingWriter, TensorFile, TensorPlan, dtype_name, read_header


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
