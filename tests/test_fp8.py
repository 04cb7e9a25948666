"""fp8 outputs of ``fuse`` (``--dtype fp8``, scaled and plain), as ComfyUI reads them (see lora_tools/io/fp8.py).

The oracle of each fp8 tensor is computed here from the ``--dtype fp32`` fuse of the same inputs (the exact
fusion): scaled form ``e4m3fn(fusion / scale)`` with ``scale`` the smallest power of two with ``amax / scale <= 448``,
plain form ``e4m3fn(fusion)``.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner

from lora_tools.cli import cli
from lora_tools.io.safetensors import TensorFile, load_tensors, read_header


def _fuse(inputs: SimpleNamespace, out: Path, *args: str) -> str:
    r = CliRunner().invoke(cli, ["fuse", str(inputs.base), "--lora", str(inputs.lora), "-o", str(out), *args])
    assert r.exit_code == 0, r.output
    return r.output


@pytest.fixture(scope="module")
def outputs(tiny_unet_inputs: SimpleNamespace, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("fp8")
    o = SimpleNamespace(root=root)
    o.f32 = root / "f32.safetensors"
    o.f16 = root / "f16.safetensors"
    o.scaled = root / "scaled.safetensors"
    o.plain = root / "plain.safetensors"
    _fuse(tiny_unet_inputs, o.f32, "--dtype", "fp32")
    _fuse(tiny_unet_inputs, o.f16, "--dtype", "fp16")
    o.scaled_out = _fuse(tiny_unet_inputs, o.scaled, "--dtype", "fp8")
    o.plain_out = _fuse(tiny_unet_inputs, o.plain, "--dtype", "fp8", "--fp8", "plain")
    return o


def _pow2_scale(w: torch.Tensor) -> float:
    """The smallest power of two ``s`` with ``amax / s <= 448``, found by walking the powers of two."""
    amax, s = float(w.abs().max()), 2.0 ** -60
    while amax / s > 448.0:
        s *= 2.0
    return s


def _fp8_keys(path: Path) -> list[str]:
    return [k for k, t in read_header(path).tensors.items() if t.dtype == "F8_E4M3" and not k.endswith("scaled_fp8")]


def test_scaled_fp8_is_the_fp32_fusion_rounded_once(outputs: SimpleNamespace) -> None:
    fusion = load_tensors(outputs.f32)
    got = load_tensors(outputs.scaled)
    keys = _fp8_keys(outputs.scaled)
    assert keys and all(k.startswith("model.diffusion_model.") and k.endswith(".weight") for k in keys)
    assert all(fusion[k].dim() == 2 for k in keys)  # ComfyUI's scaled-fp8 ops scale Linear layers only
    convs = [k for k, t in fusion.items() if k.startswith("model.diffusion_model.") and t.dim() == 4]
    assert convs and all(got[k].dtype == torch.float16 and f"{k[:-6]}scale_weight" not in got for k in convs)
    marker = got["model.diffusion_model.scaled_fp8"]
    # comfy/model_detection.py reads its dtype; 2 elements: no fp8 matmul (activations are not rounded to fp8)
    assert marker.dtype == torch.float8_e4m3fn and marker.numel() == 2
    for k in keys:
        scale = got[k[: -len("weight")] + "scale_weight"]
        assert scale.dtype == torch.float32 and scale.shape == ()
        w = fusion[k].float()
        assert float(scale) == _pow2_scale(w), k
        want = (w / scale).clamp(-448, 448).to(torch.float8_e4m3fn)
        assert torch.equal(got[k].view(torch.uint8), want.view(torch.uint8)), k
        assert torch.equal(got[k].float() * scale, want.float() * scale)  # dequantised, as ComfyUI uses it
        assert 224.0 <= float(got[k].float().abs().max()) <= 448.0  # the largest weight in e4m3fn's top binade


def test_non_fp8_tensors_are_the_fp16_outputs_bytes(outputs: SimpleNamespace) -> None:
    h8, h16 = read_header(outputs.scaled), read_header(outputs.f16)
    fp8 = set(_fp8_keys(outputs.scaled))
    rest = [k for k in h16.tensors if k not in fp8]
    assert rest and any(k.endswith(".bias") for k in rest) and any("norm" in k for k in rest)
    with TensorFile(outputs.scaled) as a, TensorFile(outputs.f16) as b:
        for k in rest:
            assert a.info(k).dtype == b.info(k).dtype
            assert a.read_bytes(k) == b.read_bytes(k), k
    assert set(h8.tensors) - set(h16.tensors) == {"model.diffusion_model.scaled_fp8"} | {
        k[: -len("weight")] + "scale_weight" for k in fp8}


def test_plain_fp8(outputs: SimpleNamespace) -> None:
    fusion = load_tensors(outputs.f32)
    got = load_tensors(outputs.plain)
    keys = _fp8_keys(outputs.plain)
    assert [k for k in keys if got[k].dim() == 2] == _fp8_keys(outputs.scaled)
    assert any(got[k].dim() == 4 for k in keys)  # plain: conv weights too (ComfyUI's fp8 weight option casts all)
    assert not any(k.endswith(("scale_weight", "scaled_fp8")) for k in got)
    for k in keys:
        want = fusion[k].float().clamp(-448, 448).to(torch.float8_e4m3fn)
        assert torch.equal(got[k].view(torch.uint8), want.view(torch.uint8)), k


def test_summary_states_size_and_rounding_error(outputs: SimpleNamespace) -> None:
    fusion = load_tensors(outputs.f32)
    got = load_tensors(outputs.scaled)
    err = ref = 0.0
    worst = ("", -1.0)
    for k in _fp8_keys(outputs.scaled):
        w = fusion[k].float()
        d = got[k].float() * got[k[: -len("weight")] + "scale_weight"] - w
        e, r = float(d.pow(2).sum()), float(w.pow(2).sum())
        err, ref = err + e, ref + r
        worst = max(worst, (k, (e / r) ** 0.5), key=lambda x: x[1])
    text = outputs.scaled_out
    assert f"relative Frobenius error {(err / ref) ** 0.5:.3%}" in text
    assert f"worst tensor {worst[0]} ({worst[1]:.2%})" in text
    assert "smaller than in fp16" in text and "fp8 scaled: scaled.safetensors" in text


def _data_bytes(path: Path) -> int:
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
    return path.stat().st_size - 8 - n


def test_dry_run_predicts_the_size(tiny_unet_inputs: SimpleNamespace, outputs: SimpleNamespace, tmp_path: Path) -> None:
    from lora_tools.ops.fuse_plan import plan_fuse

    for form, path in (("scaled", outputs.scaled), ("plain", outputs.plain)):
        plan = plan_fuse(tiny_unet_inputs.base, loras=[(str(tiny_unet_inputs.lora), 1.0)], dtype="fp8", fp8=form,  # type: ignore[arg-type]
                         output=tmp_path / "x.safetensors")
        try:
            assert plan.output_bytes("checkpoint") == _data_bytes(path)
            assert plan.fp16_bytes("checkpoint") == _data_bytes(outputs.f16)
        finally:
            plan.close()
    r = CliRunner().invoke(cli, ["fuse", str(tiny_unet_inputs.base), "--lora", str(tiny_unet_inputs.lora), "--dtype",
                                  "fp8", "-o", str(tmp_path / "y.safetensors"), "--dry-run"])
    assert r.exit_code == 0, r.output
    assert "fp8 scaled;" in r.output and "in fp16" in r.output
    assert not (tmp_path / "y.safetensors").exists()


@pytest.mark.slow
def test_standalone_unet_fp8_is_plain(tiny_unet_inputs: SimpleNamespace, outputs: SimpleNamespace,
                                      tmp_path: Path) -> None:
    """A standalone UNet gets the plain form by default (ComfyUI reads the scaled form in single files only)."""
    out = tmp_path / "u.safetensors"
    _fuse(tiny_unet_inputs, out, "--dtype", "fp8", "--save", "unet")
    got = load_tensors(out)
    assert "scaled_fp8" not in got and not any(k.endswith("scale_weight") for k in got)
    keys = _fp8_keys(out)
    assert keys and all(not k.startswith("model.") for k in keys)
    assert len(keys) == len(_fp8_keys(outputs.plain))
    from lora_tools.io.model import open_model

    with open_model(out) as u, open_model(outputs.plain) as c:  # read back: the same weights as the single file's
        assert u.fp8 is not None and u.fp8.form == "plain" and u.fp8.tensors == len(keys)
        plain_keys = set(_fp8_keys(outputs.plain))
        fp8_refs = [r for r in u.refs if r.key in plain_keys]
        assert len(fp8_refs) == len(keys)
        for r in fp8_refs:
            assert torch.equal(u.read(r), c.read(c.ref(r.key))), r.key


def test_scaled_standalone_unet_is_refused(tiny_unet_inputs: SimpleNamespace, tmp_path: Path) -> None:
    r = CliRunner().invoke(cli, ["fuse", str(tiny_unet_inputs.base), "--lora", str(tiny_unet_inputs.lora), "--dtype",
                                 "fp8", "--fp8", "scaled", "--save", "unet", "-o", str(tmp_path / "u.safetensors")])
    assert r.exit_code != 0 and "--fp8 plain" in r.output and len(r.output.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())


def test_fp8_diffusers_folder_is_refused(tiny_unet_inputs: SimpleNamespace, tmp_path: Path) -> None:
    r = CliRunner().invoke(cli, ["fuse", str(tiny_unet_inputs.base), "--lora", str(tiny_unet_inputs.lora), "--dtype",
                                  "fp8", "--save", "diffusers", "-o", str(tmp_path / "d")])
    assert r.exit_code != 0
    assert "fp8" in r.output and "diffusers folder" in r.output and len(r.output.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())


def test_plain_without_fp8_is_refused(tiny_unet_inputs: SimpleNamespace, tmp_path: Path) -> None:
    r = CliRunner().invoke(cli, ["fuse", str(tiny_unet_inputs.base), "--lora", str(tiny_unet_inputs.lora), "--dtype",
                                 "fp16", "--fp8", "plain", "-o", str(tmp_path / "x.safetensors")])
    assert r.exit_code != 0 and "--dtype fp8" in r.output and len(r.output.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())


def test_record_names_the_fp8_form(outputs: SimpleNamespace) -> None:
    meta = read_header(outputs.scaled).metadata
    assert "F8_E4M3 scaled" in json.dumps(meta)


# ComfyUI's loading of these files (detected as SDXL, scaled fp8 recognised, dequantised weights equal
# ours): tests/test_comfyui.py, which runs ComfyUI's own code when it is importable.


def test_recipe_fuse_job_with_dtype_fp8(tiny_unet_inputs: SimpleNamespace, outputs: SimpleNamespace,
                                        tmp_path: Path) -> None:
    recipe = tmp_path / "fp8.yaml"
    recipe.write_text(f"""version: 1
output_dir: {tmp_path / 'out'}
inputs:
  base: {tiny_unet_inputs.base}
  lora: {tiny_unet_inputs.lora}
jobs:
  - name: small
    fuse:
      base: base
      loras: [lora]
      dtype: fp8
      fp8: plain
      output: small.safetensors
""")
    r = CliRunner().invoke(cli, ["run", str(recipe), "-q"])
    assert r.exit_code == 0, r.output
    made = tmp_path / "out" / "small.safetensors"
    with TensorFile(made) as a, TensorFile(outputs.plain) as b:
        assert a.keys() == b.keys()
        assert all(a.read_bytes(k) == b.read_bytes(k) for k in a.keys())


def test_inspect_shows_the_fp8_layout(outputs: SimpleNamespace) -> None:
    got = load_tensors(outputs.scaled)
    scales = [float(v) for k, v in got.items() if k.endswith(".scale_weight")]
    n = len(_fp8_keys(outputs.scaled))
    r = CliRunner().invoke(cli, ["inspect", str(outputs.scaled)])
    assert r.exit_code == 0, r.output
    assert f"fp8 scaled (e4m3fn): {n} fp8 tensors, scale_weight {min(scales):.3g} .. {max(scales):.3g}" in r.output
    r = CliRunner().invoke(cli, ["inspect", str(outputs.plain), "--json"])
    n_plain = len(_fp8_keys(outputs.plain))  # the scaled form's linear weights and the convs
    assert json.loads(r.output)["checkpoint"]["fp8"] == f"fp8 plain (e4m3fn): {n_plain} fp8 tensors"
    r = CliRunner().invoke(cli, ["inspect", str(outputs.f16), "--json"])
    assert json.loads(r.output)["checkpoint"]["fp8"] is None


@pytest.mark.slow
def test_fp8_base_is_fused_from_its_dequantised_weights(tiny_unet_inputs: SimpleNamespace, outputs: SimpleNamespace,
                                                        tmp_path: Path) -> None:
    from lora_tools.io.model import open_model

    got = load_tensors(outputs.scaled)
    with open_model(outputs.scaled) as m:  # every command that opens a model reads weight x scale_weight
        assert m.fp8 is not None and m.fp8.form == "scaled"
        assert not any(r.key.endswith(("scale_weight", "scaled_fp8")) for r in m.refs)
        k = _fp8_keys(outputs.scaled)[0]
        want = got[k].float() * got[k[: -len("weight")] + "scale_weight"]
        assert m.ref(k).dtype == "F32" and torch.equal(m.read(m.ref(k)), want)
    out = tmp_path / "again.safetensors"
    r = CliRunner().invoke(cli, ["fuse", str(outputs.scaled), "--lora", f"{tiny_unet_inputs.lora}:-1", "--dtype", "fp32",
                                 "-o", str(out), "-q"])
    assert r.exit_code == 0, r.output
    assert "inherits their fp8 rounding" in r.output
    again, base = load_tensors(out), load_tensors(tiny_unet_inputs.base)
    assert set(again) == set(base)  # the scale and marker tensors are gone
    for k in _fp8_keys(outputs.scaled):  # fused - LoRA = the base, up to the fp8 rounding
        w = base[k].float()
        assert float((again[k] - w).norm() / w.norm()) < 0.08, k
    keep = tmp_path / "keep.safetensors"  # --dtype keep keeps the base's fp8 form
    r = CliRunner().invoke(cli, ["fuse", str(outputs.plain), "--lora", str(tiny_unet_inputs.lora), "--force",
                                 "-o", str(keep)])  # the summary (no -q: it prints only the paths written)
    assert r.exit_code == 0, r.output
    assert set(_fp8_keys(keep)) == set(_fp8_keys(outputs.plain)) and "fp8 plain:" in r.output


@pytest.mark.diffusers
def test_verify_renders_the_fp8_file_against_the_full_precision_one(micro_verify: dict[str, Path]) -> None:
    from lora_tools.ops.fuse import fuse

    d = micro_verify["dir"]
    small = fuse(micro_verify["base"], lightning=4, lightning_dir=d / "L", dtype="fp8",
                 output=d / "fused-fp8.safetensors").files[0].path
    out = d / "fp8-verdict"
    r = CliRunner().invoke(cli, ["verify", str(small), "--against", str(micro_verify["fused"]), "--config",
                                 str(micro_verify["config"]), "--size", "32x32", "--prompt", "a cat", "--seeds", "0",
                                 "--device", "cpu", "--dtype", "fp32", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "Verdict:  PASS (PSNR threshold 30 dB for fp32, fp8 scaled weights)" in r.output
    report = json.loads((out / "report.json").read_text())
    assert report["threshold"]["weights"] == "fp8 scaled"
    psnr = report["images"][0]["psnr_db"]
    assert 30 <= psnr < 80  # a real change (not bit-identical), within the fp8 threshold
    nolora = CliRunner().invoke(cli, ["verify", str(micro_verify["fused"]), "--against", str(micro_verify["base"]),
                                      "--size", "32x32", "--device", "cpu"])
    assert nolora.exit_code != 0 and "needs the LoRAs" in nolora.output  # still required for a full-precision model


@pytest.mark.parametrize("amax,scale", [(448.0, 1.0), (448.00003, 2.0), (224.0, 0.5), (224.00002, 1.0), (1.0, 2.0 ** -8),
                                        (0.02, 2.0 ** -14), (0.0, 1.0), (float("nan"), 1.0), (3e38, 2.0 ** 120)])
def test_the_scale_is_the_smallest_power_of_two_that_fits(amax: float, scale: float) -> None:
    from lora_tools.io import fp8

    assert fp8.scale_for(amax) == scale
    if amax > 0:
        assert amax / scale <= 448.0 < amax / (scale / 2)


@pytest.mark.slow
@pytest.mark.parametrize("form,top", [("scaled", None), ("plain", 440.0)])
def test_a_fusion_rounded_block_by_block_is_rounded_again_when_its_largest_weight_changes_binade(
        form: str, top: float | None, tiny_unet_inputs: SimpleNamespace, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine rounds each patched row block to fp8 while it is in the cache (no fp32 copy of the tensor),
    with a scale taken from the base; where the LoRA moves the largest weight into another binade (a strength
    of 300), or beyond +-448 for the plain form (a base whose weights reach 440), the blocks are rounded again. The file holds the
    fp32 fusion rounded once all the same, and the summary's error is the exact one."""
    from lora_tools.io import fp8

    verdicts: list[bool] = []
    fits = fp8.BlockRounder.fits
    monkeypatch.setattr(fp8.BlockRounder, "fits", lambda self, amax: verdicts.append(fits(self, amax)) or verdicts[-1])
    from safetensors.torch import save_file

    base, lora = str(tmp_path / "base.safetensors"), f"{tiny_unet_inputs.lora}:300"
    save_file({k: (v.float() * (top / float(v.float().abs().max()))).half() if top and v.dim() >= 2 else v
               for k, v in load_tensors(tiny_unet_inputs.base).items()}, base)
    f32, out = tmp_path / "f32.safetensors", tmp_path / "fp8.safetensors"
    for path, args in ((f32, ["--dtype", "fp32"]), (out, ["--dtype", "fp8", "--fp8", form])):
        r = CliRunner().invoke(cli, ["fuse", base, "--lora", lora, "-o", str(path), *args])
        assert r.exit_code == 0, r.output
    assert False in verdicts and True in verdicts  # some tensors were rounded again, some once
    fusion, got = load_tensors(f32), load_tensors(out)
    err = ref = 0.0
    for k in _fp8_keys(out):
        w = fusion[k].float()
        scale = float(got[fp8.scale_key(k)]) if form == "scaled" else 1.0
        if form == "scaled":
            assert scale == _pow2_scale(w), k
        want = (w / scale).clamp(-448, 448).to(torch.float8_e4m3fn)
        assert torch.equal(got[k].view(torch.uint8), want.view(torch.uint8)), k
        err += float((want.double() * scale - w.double()).pow(2).sum())
        ref += float(w.double().pow(2).sum())
    assert f"relative Frobenius error {(err / ref) ** 0.5:.3%}" in r.output


def test_every_tensor_rounded_to_fp8_is_ordered_as_computed(tiny_unet_inputs: SimpleNamespace, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The stream order leads with tensors copied as read, written while torch loads; a tensor rounded to fp8 needs
    torch like a patched one, so it is not among them (it would hold the writer up until torch is loaded)."""
    import lora_tools.ops.fuse as fuse_module

    computed: set[str] = set()
    real = fuse_module.stream_order

    def spy(refs, keys):  # type: ignore[no-untyped-def]
        computed.update(keys)
        return real(refs, keys)

    monkeypatch.setattr(fuse_module, "stream_order", spy)
    out = tmp_path / "fp8.safetensors"
    _fuse(tiny_unet_inputs, out, "--dtype", "fp8")
    rounded = set(_fp8_keys(out))
    assert rounded and rounded <= computed
