"""``loratool fuse`` end to end: CliRunner for what users run, a subprocess for interrupts.

Success paths run with ``catch_exceptions=False``; results go to stdout, warnings and errors to
stderr. Every refused input must exit 1 with exactly one ``Error:`` line that names the file, and
leave every folder involved exactly as it was.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner, Result

from lora_tools.cli import cli
from lora_tools.io.safetensors import (
    StreamingWriter,
    TensorFile,
    load_tensors,
    read_header,
    save_tensors,
    torch_dtype,
)
from lora_tools.ops.fuse import fuse
from lora_tools.testing.synthetic_lora import make_lora
from tests.fork_server import ForkedRun
from tests.fuse_helpers import (
    BASE_METADATA,
    LIGHTNING_LORA,
    LIGHTNING_UNET_1,
    LIGHTNING_UNET_4,
    REL_TOL,
    FuseAssets,
    compare,
    fill_hub_cache,
    listing,
    n_targets,
    our_key,
    sha256_of,
    target_keys,
    to_diffusers,
)

ALL_TE = ("unet", "te1", "te2")
LIGHTNING_SAMPLER = {
    "scheduler": "EulerDiscreteScheduler", "timestep_spacing": "trailing", "steps": 4, "guidance_scale": 0.0,
    "prediction_type": "epsilon", "comfy_sampler": "euler", "comfy_scheduler": "sgm_uniform", "comfy_cfg": 1.0,
}


def fuse_ok(*args: object) -> Result:
    result = CliRunner().invoke(cli, ["fuse", *map(str, args)], catch_exceptions=False)
    assert result.exit_code == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result


def fuse_fails(folders: tuple[Path, ...], *args: object, names: str) -> str:
    """Run a fuse that must be refused; returns its one ``Error:`` line."""
    before = [listing(f) for f in folders]
    result = CliRunner().invoke(cli, ["fuse", *map(str, args)])
    assert result.exit_code == 1, f"exit {result.exit_code}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert isinstance(result.exception, SystemExit), f"crashed instead of a clean error: {result.exception!r}"
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert names in lines[0], lines[0]
    assert result.stdout == ""
    assert [listing(f) for f in folders] == before, "a refused fuse changed a folder"
    return lines[0]


def record_of(path: Path) -> dict:
    return json.loads(read_header(path).metadata["loratool"])


def tensor_bytes(path: Path) -> dict[str, bytes]:
    with TensorFile(path) as f:
        return {k: bytes(f.read_bytes(k)) for k in f.keys()}


def test_fuse_help_shows_example() -> None:
    result = CliRunner().invoke(cli, ["fuse", "--help"], catch_exceptions=False)
    assert result.exit_code == 0
    assert "Example:" in result.stdout
    assert "loratool fuse juggernaut.safetensors --lightning 4" in result.stdout


# ---------------------------------------------------------------------------- Lightning + style, keep and fp16


@pytest.fixture(scope="module")
def runs(assets: FuseAssets, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    d = tmp_path_factory.mktemp("cli-runs")
    common = ["--lightning", "4", "--lightning-dir", assets.lightning_dir, "--lora", f"{assets.style}:0.6"]
    # dtype keep, all three outputs in one pass
    keep = fuse_ok(assets.base, *common, "--save", "checkpoint", "--save", "unet", "--save", "diffusers",
                   "-o", d / "keep.safetensors")
    fp16 = fuse_ok(assets.base, *common, "--dtype", "fp16", "-o", d / "fp16.safetensors")
    return SimpleNamespace(dir=d, keep=d / "keep.safetensors", fp16=d / "fp16.safetensors", keep_result=keep,
                           fp16_result=fp16, unet=d / "keep-unet.safetensors", diffusers=d / "keep-diffusers")


def patched_keys() -> set[str]:
    return target_keys("lightning") | target_keys("attn", ALL_TE)


@pytest.mark.diffusers
def test_cli_fuse_equals_diffusers(assets: FuseAssets, runs: SimpleNamespace) -> None:
    ours = to_diffusers(runs.keep)
    for comp in ALL_TE:
        _, changed, worst, key = compare(ours[comp], assets.oracle_lightning_style[comp], assets.base_sd[comp], comp)
        assert changed == (n_targets("lightning") if comp == "unet" else n_targets("attn", (comp,)))
        assert worst <= REL_TOL, f"{comp}.{key}: {worst:.3g}"


def test_summary_on_stdout_nothing_on_stderr(runs: SimpleNamespace) -> None:
    out = runs.keep_result.stdout
    modules = n_targets("lightning") + n_targets("attn", ALL_TE)
    assert f"Fused {modules} modules into {len(patched_keys())} tensors" in out
    assert f"Wrote {runs.keep} (" in out
    assert "Use it with: EulerDiscreteScheduler, timestep_spacing=trailing, 4 steps, guidance_scale=0" in out
    assert runs.keep_result.stderr == ""


def test_keep_copies_untouched_tensor_bytes(assets: FuseAssets, runs: SimpleNamespace) -> None:
    base, keep = tensor_bytes(assets.base), tensor_bytes(runs.keep)
    assert sorted(keep) == sorted(base)  # same keys (patched and copied tensors are interleaved in the output)
    changed = {k for k in base if keep[k] != base[k]}
    assert changed == patched_keys()
    assert read_header(runs.keep).tensors.keys() == read_header(assets.base).tensors.keys()
    assert {t.dtype for t in read_header(runs.keep).tensors.values()} == {"F32", "I64"}


def test_fp16_is_the_fp32_result_rounded_once(assets: FuseAssets, runs: SimpleNamespace) -> None:
    keep, half, base = load_tensors(runs.keep), load_tensors(runs.fp16), load_tensors(assets.base)
    assert list(half) == list(keep)
    patched = patched_keys()
    for key, t in half.items():
        if base[key].is_floating_point():
            assert t.dtype == torch.float16, key
            assert torch.equal(t, keep[key].to(torch.float16)), key
            if key in patched:  # the rounding happened once, after the fp32 maths
                assert not torch.equal(t, base[key].to(torch.float16)), key
        else:
            assert torch.equal(t, base[key]), key
    assert record_of(runs.fp16)["output_dtype"] == "F16"


def test_metadata_and_record(assets: FuseAssets, runs: SimpleNamespace) -> None:
    meta = read_header(runs.keep).metadata
    for k, v in BASE_METADATA.items():
        assert meta[k] == v
    assert meta["modelspec.sai_model_spec"] == "1.0.0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    assert meta["modelspec.prediction_type"] == "epsilon"
    assert "trailing" in meta["modelspec.usage_hint"] and "4 steps" in meta["modelspec.usage_hint"]
    assert [n.strip() for n in meta["modelspec.merged_from"].split(",")] == ["base.safetensors", LIGHTNING_LORA,
                                                                              "style.safetensors"]
    record = json.loads(meta["loratool"])
    assert record["operation"] == "fuse" and record["method"] == "lora"
    assert record["lightning_steps"] == 4
    assert record["output_dtype"] == "keep"
    assert record["sampler"] == LIGHTNING_SAMPLER
    loras = [(s["name"], s["strength"], s["sha256"], s.get("preset")) for s in record["sources"] if s["role"] == "lora"]
    assert loras == [(LIGHTNING_LORA, 1.0, sha256_of(assets.lightning_lora), "lightning-4step"),
                     ("style.safetensors", 0.6, sha256_of(assets.style), None)]
    assert [s["name"] for s in record["sources"] if s["role"] == "base"] == ["base.safetensors"]


def test_record_has_sha256_of_the_base(assets: FuseAssets, runs: SimpleNamespace) -> None:
    base = next(s for s in record_of(runs.keep)["sources"] if s["role"] == "base")
    assert base.get("sha256") == sha256_of(assets.base)  # small bases are hashed in full; big ones with --hash-base
    assert base["size"] == assets.base.stat().st_size and len(base["header_sha256"]) == 64


# ---------------------------------------------------------------------------- --save unet / diffusers


def test_several_outputs_in_one_pass(runs: SimpleNamespace) -> None:
    out = runs.keep_result.stdout
    for path in (runs.keep, runs.unet, runs.diffusers / "unet" / "diffusion_pytorch_model.safetensors"):
        assert f"Wrote {path} (" in out
    assert sorted(p.name for p in runs.dir.iterdir()) == ["fp16.safetensors", "keep-diffusers", "keep-unet.safetensors",
                                                           "keep.safetensors"]  # no temp files left
    # the standalone UNet, the folder's UNet and the checkpoint's UNet hold the same bytes
    unet = tensor_bytes(runs.unet)
    assert tensor_bytes(runs.diffusers / "unet" / "diffusion_pytorch_model.safetensors") == unet
    ckpt = to_diffusers(runs.keep, ("unet",))["unet"]
    standalone = load_tensors(runs.unet)
    assert set(standalone) == set(ckpt)
    assert all(torch.equal(standalone[k], v) for k, v in ckpt.items())


@pytest.mark.diffusers
def test_save_unet_loads_strictly_and_equals_diffusers(assets: FuseAssets, runs: SimpleNamespace) -> None:
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(assets.folder / "unet"))
    unet.load_state_dict(load_file(runs.unet), strict=True)
    sd = unet.state_dict()
    _, changed, worst, key = compare(sd, assets.oracle_lightning_style["unet"], assets.base_sd["unet"], "unet")
    assert changed == n_targets("lightning")
    assert worst <= REL_TOL, key
    record = record_of(runs.unet)
    assert record["lightning_steps"] == 4 and record["sampler"] == LIGHTNING_SAMPLER


@pytest.mark.diffusers
def test_save_diffusers_runs_one_step(assets: FuseAssets, runs: SimpleNamespace) -> None:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    folder = runs.diffusers
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert config["_class_name"] == "EulerDiscreteScheduler"
    assert config["timestep_spacing"] == "trailing" and config["prediction_type"] == "epsilon"
    pipe = StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.scheduler, EulerDiscreteScheduler)
    assert pipe.scheduler.config.timestep_spacing == "trailing"
    oracle = assets.oracle_lightning_style
    for comp, attr in (("unet", "unet"), ("te1", "text_encoder"), ("te2", "text_encoder_2")):
        loaded = {our_key(assets.base_sd[comp], k): v for k, v in getattr(pipe, attr).state_dict().items()}
        _, changed, worst, key = compare(loaded, oracle[comp], assets.base_sd[comp], comp)
        assert changed == (n_targets("lightning") if comp == "unet" else n_targets("attn", (comp,)))
        assert worst <= REL_TOL, f"{comp}.{key}"
    latents = pipe("a lighthouse", num_inference_steps=1, height=64, width=64, guidance_scale=0.0,
                   output_type="latent", generator=torch.Generator().manual_seed(0)).images
    assert latents.shape == (1, 4, 8, 8)
    assert torch.isfinite(latents).all() and latents.abs().max() > 0


# ---------------------------------------------------------------------------- --method unet (add difference)


def _diffusers_unet_plus_difference(base_unet: dict[str, torch.Tensor], tuned: Path, original: Path) -> dict[str, torch.Tensor]:
    t, o = load_tensors(tuned), load_tensors(original)
    assert set(t) == set(o) == set(base_unet)
    return {k: base_unet[k] + (t[k].float() - o[k].float()) for k in base_unet}


@pytest.mark.slow  # over a second on a quiet machine: full selection
def test_method_unet_adds_the_difference(assets: FuseAssets, tmp_path: Path) -> None:
    out = tmp_path / "diff.safetensors"
    result = fuse_ok(assets.base, "--lightning", "4", "--method", "unet", "--lightning-dir", assets.unet_dir,
                     "--original-unet", assets.original_unet, "-o", out)
    want = _diffusers_unet_plus_difference(assets.base_sd["unet"], assets.unet_dir / LIGHTNING_UNET_4, assets.original_unet)
    ours = to_diffusers(out)
    for k, w in want.items():
        assert torch.equal(ours["unet"][k], w), k
    assert sum(not torch.equal(ours["unet"][k], v) for k, v in assets.base_sd["unet"].items()) == len(want)
    base, fused = tensor_bytes(assets.base), tensor_bytes(out)
    unet_prefix = "model.diffusion_model."
    assert all(fused[k] == v for k, v in base.items() if not k.startswith(unet_prefix))
    record = record_of(out)
    assert record["method"] == "unet" and record["lightning_steps"] == 4 and record["sampler"] == LIGHTNING_SAMPLER
    diff = [s for s in record["sources"] if s["role"] == "unet-difference"]
    assert len(diff) == 1
    assert (diff[0]["tuned"], diff[0]["original"], diff[0]["strength"], diff[0]["preset"]) == (
        LIGHTNING_UNET_4, assets.original_unet.name, 1.0, "lightning-4step")
    assert not any(s["role"] == "lora" for s in record["sources"])
    assert "Use it with:" in result.stdout


@pytest.mark.slow  # over a second on a quiet machine: full selection
def test_lightning_1step_uses_x0_unet_and_sample_prediction(assets: FuseAssets, tmp_path: Path) -> None:
    out = tmp_path / "one.safetensors"
    result = fuse_ok(assets.base, "--lightning", "1", "--lightning-dir", assets.unet_dir,
                     "--original-unet", assets.original_unet, "--save", "checkpoint", "--save", "diffusers", "-o", out)
    want = _diffusers_unet_plus_difference(assets.base_sd["unet"], assets.unet_dir / LIGHTNING_UNET_1, assets.original_unet)
    ours = to_diffusers(out)
    assert all(torch.equal(ours["unet"][k], w) for k, w in want.items())
    record = record_of(out)
    assert record["method"] == "unet" and record["lightning_steps"] == 1
    assert record["sampler"] == {**LIGHTNING_SAMPLER, "steps": 1, "prediction_type": "sample"}
    assert [s["tuned"] for s in record["sources"] if s["role"] == "unet-difference"] == [LIGHTNING_UNET_1]
    assert read_header(out).metadata["modelspec.prediction_type"] == "sample"
    config = json.loads((tmp_path / "one-diffusers" / "scheduler" / "scheduler_config.json").read_text())
    assert (config["_class_name"], config["timestep_spacing"], config["prediction_type"]) == (
        "EulerDiscreteScheduler", "trailing", "sample")
    assert 'prediction_type="sample"' in result.stdout


# ---------------------------------------------------------------------------- the hub (offline, pre-filled cache)


@pytest.mark.slow  # over a second on a quiet machine: full selection
def test_lightning_from_the_hub_cache(assets: FuseAssets, tmp_path: Path, offline_hub: Path) -> None:
    fill_hub_cache(offline_hub, "ByteDance/SDXL-Lightning", LIGHTNING_LORA, assets.lightning_lora.read_bytes())
    out = tmp_path / "out" / "hub.safetensors"
    result = fuse_ok(assets.base, "--lightning", "4", "-o", out)
    assert result.stderr == ""
    record = record_of(out)
    lora = [s for s in record["sources"] if s["role"] == "lora"]
    assert [(s["name"], s["preset"], s["sha256"]) for s in lora] == [
        (LIGHTNING_LORA, "lightning-4step", sha256_of(assets.lightning_lora))]
    assert record["lightning_steps"] == 4 and record["sampler"] == LIGHTNING_SAMPLER
    ref = tmp_path / "ref.safetensors"
    fuse(assets.base, lightning=4, lightning_dir=assets.lightning_dir, output=ref)
    fused, base = tensor_bytes(out), tensor_bytes(assets.base)
    assert fused == tensor_bytes(ref)
    assert {k for k in base if fused[k] != base[k]} == target_keys("lightning")


def test_lightning_not_in_the_hub_cache(assets: FuseAssets, tmp_path: Path, offline_hub: Path) -> None:
    line = fuse_fails((tmp_path, assets.root), assets.base, "--lightning", "4", "-o", tmp_path / "x.safetensors",
                      names=LIGHTNING_LORA)
    assert "ByteDance/SDXL-Lightning" in line
    assert "HF_HUB_OFFLINE" in line
    assert "download ByteDance/SDXL-Lightning sdxl_lightning_4step_lora.safetensors" in line
    assert "--lora" in line


@pytest.mark.slow
def test_lightning_lora_given_with_lora_records_the_sampler(assets: FuseAssets, tmp_path: Path) -> None:
    out = tmp_path / "by-lora.safetensors"
    fuse_ok(assets.base, "--lora", assets.lightning_lora, "-o", out)
    record = record_of(out)
    assert record["lightning_steps"] == 4
    assert record.get("sampler") == LIGHTNING_SAMPLER


# ---------------------------------------------------------------------------- interrupts (subprocess)


def _fingerprint(path: Path) -> tuple:
    st = path.stat()
    with open(path, "rb") as f:
        head = hashlib.sha256(f.read(1 << 20)).hexdigest()
        f.seek(-(1 << 20), 2)
        tail = hashlib.sha256(f.read()).hexdigest()
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, head, tail


@pytest.mark.subprocess  # a process of its own, forked by conftest's forked_cli
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_interrupted_fuse_leaves_no_output(forked_cli: Callable[..., ForkedRun], medium_model: SimpleNamespace,
                                           tmp_path: Path, sig: signal.Signals) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "fused.safetensors"
    before = _fingerprint(medium_model.base)
    ready = tmp_path / "mid-stream"
    # The output package's fault hook holds the fuse mid-stream (its temp file half written) until the
    # signal comes, so the signal lands there however fast or loaded the machine is.
    env = dict(os.environ, LORATOOL_TEST_PAUSE_AT="mid-stream", LORATOOL_TEST_READY=str(ready))
    proc = forked_cli(["fuse", str(medium_model.base), "--lora", str(medium_model.lora), "-o", str(out), "-q"], env=env)
    try:
        deadline = time.monotonic() + 120
        while True:  # wait until the output is being written: a temp file next to it
            partial = list(out_dir.glob(f".{out.name}.*.partial"))
            if partial and ready.exists():
                break
            assert proc.poll() is None, "the fuse ended before it could be interrupted: make the model bigger"
            assert time.monotonic() < deadline, "no .partial file appeared"
            time.sleep(0.005)
        assert not out.exists()
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert not out.exists()
    assert _fingerprint(medium_model.base) == before
    if sig == signal.SIGINT:
        assert proc.returncode == 130, stderr
        assert "Interrupted: nothing was written under the output names." in stderr
        assert list(out_dir.iterdir()) == []  # the temp file is gone too
    else:
        assert proc.returncode == -signal.SIGKILL
        assert all(p.name.endswith(".partial") for p in out_dir.iterdir())


# ---------------------------------------------------------------------------- bad inputs


def _kohya_lora(path: Path, modules: dict[str, tuple[int, int]]) -> Path:
    """A hand-made kohya LoRA: module name -> (out, in) of its delta."""
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name, (o, i) in modules.items():
        tensors[f"lora_unet_{name}.lora_down.weight"] = torch.randn(4, i, generator=g) * 0.1
        tensors[f"lora_unet_{name}.lora_up.weight"] = torch.randn(o, 4, generator=g) * 0.1
        tensors[f"lora_unet_{name}.alpha"] = torch.tensor(4.0)
    return save_tensors(path, tensors, {"format": "pt"})


def test_sd15_widths_are_refused(assets: FuseAssets, tmp_path: Path) -> None:
    # SD1.5's down_blocks.1 is 640 wide with a 768-wide CLIP-L context; this tiny SDXL has 64 and 64
    lora = _kohya_lora(tmp_path / "sd15-widths.safetensors", {
        "down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k": (640, 768),
        "down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_v": (640, 768)})
    line = fuse_fails((tmp_path, assets.root), assets.base, "--lora", lora, "-o", tmp_path / "o.safetensors",
                      names="sd15-widths.safetensors")
    assert "does not fit" in line and "768" in line


def test_sd15_names_are_refused(assets: FuseAssets, tmp_path: Path) -> None:
    # SDXL has no attention in down_blocks.0 and no up_blocks.3
    lora = _kohya_lora(tmp_path / "sd15-names.safetensors", {
        "down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": (320, 768),
        "up_blocks_3_attentions_2_transformer_blocks_0_attn1_to_q": (320, 320)})
    line = fuse_fails((tmp_path, assets.root), assets.base, "--lora", lora, "-o", tmp_path / "o.safetensors",
                      names="sd15-names.safetensors")
    assert "2 of 2 modules" in line and "SD1.x" in line and "--allow-unmatched" not in line  # nothing would be left to fuse


def test_allow_unmatched_still_refuses_a_lora_that_matches_nothing(assets: FuseAssets, tmp_path: Path) -> None:
    lora = _kohya_lora(tmp_path / "sd15-names.safetensors", {
        "down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": (320, 768)})
    fuse_fails((tmp_path, assets.root), assets.base, "--lora", lora, "--allow-unmatched", "-o", tmp_path / "o.safetensors",
               names="sd15-names.safetensors")


@pytest.mark.slow
def test_unmatched_modules(assets: FuseAssets, tmp_path: Path) -> None:
    tensors, meta = make_lora("tiny", fmt="kohya-diffusers", targets="attn", rank=4, alpha=2.0, seed=3)
    tensors["lora_unet_not_a_module_of_sdxl.lora_down.weight"] = torch.zeros(4, 64)
    tensors["lora_unet_not_a_module_of_sdxl.lora_up.weight"] = torch.zeros(64, 4)
    lora = save_tensors(tmp_path / "extra.safetensors", tensors, meta)
    out = tmp_path / "o.safetensors"
    line = fuse_fails((tmp_path, assets.root), assets.base, "--lora", lora, "-o", out, names="extra.safetensors")
    assert f"1 of {n_targets('attn') + 1} modules" in line and "not_a_module_of_sdxl" in line
    assert "--allow-unmatched" in line

    result = fuse_ok(assets.base, "--lora", lora, "--allow-unmatched", "-o", out)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Warning: ") and "1 unmatched" in lines[0], result.stderr
    assert "extra.safetensors" in lines[0]
    base, fused = tensor_bytes(assets.base), tensor_bytes(out)
    assert {k for k in base if fused[k] != base[k]} == target_keys("attn")


@pytest.mark.slow  # over a second on a quiet machine: full selection
def test_existing_output_needs_overwrite(assets: FuseAssets, tmp_path: Path) -> None:
    out = tmp_path / "exists.safetensors"
    out.write_bytes(b"an older file")
    line = fuse_fails((tmp_path, assets.root), assets.base, "--lightning", "4", "--lightning-dir", assets.lightning_dir,
                      "-o", out, names="exists.safetensors")
    assert line == f"Error: '{out}' already exists: pass --overwrite to replace it, or -o to choose another name."
    assert out.read_bytes() == b"an older file"
    fuse_ok(assets.base, "--lightning", "4", "--lightning-dir", assets.lightning_dir, "-o", out, "--overwrite", "-q")
    assert record_of(out)["lightning_steps"] == 4


def test_output_onto_the_base_is_refused(assets: FuseAssets, tmp_path: Path) -> None:
    before = _fingerprint(assets.base)
    line = fuse_fails((tmp_path, assets.root), assets.base, "--lightning", "4", "--lightning-dir", assets.lightning_dir,
                      "-o", assets.base, "--overwrite", names="base.safetensors")
    assert "input" in line
    assert _fingerprint(assets.base) == before


def test_lightning_twice_needs_force(assets: FuseAssets, runs: SimpleNamespace, tmp_path: Path) -> None:
    # runs.keep already has Lightning 4-step fused in by lora_tools
    line = fuse_fails((tmp_path, runs.dir, assets.root), runs.keep, "--lightning", "4", "--lightning-dir",
                      assets.lightning_dir, "-o", tmp_path / "twice.safetensors", names="keep.safetensors")
    assert "already has Lightning 4-step" in line and "--force" in line
    out = tmp_path / "twice.safetensors"
    fuse_ok(runs.keep, "--lightning", "4", "--lightning-dir", assets.lightning_dir, "--force", "-o", out, "-q")
    assert record_of(out)["lightning_steps"] == 4
    assert tensor_bytes(out) != tensor_bytes(runs.keep)  # --force really fused a second time


def test_lora_with_nan_is_refused(assets: FuseAssets, tmp_path: Path) -> None:
    tensors, meta = make_lora("tiny", fmt="kohya-diffusers", targets="attn", rank=4, alpha=2.0)
    key = sorted(k for k in tensors if k.endswith("lora_up.weight"))[5]
    tensors[key][0, 0] = float("nan")
    lora = save_tensors(tmp_path / "nan.safetensors", tensors, meta)
    line = fuse_fails((tmp_path, assets.root), assets.base, "--lora", lora, "-o", tmp_path / "o.safetensors",
                      names="nan.safetensors")
    assert "NaN" in line and key in line


def test_sd1_base_is_refused(assets: FuseAssets, tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    base = save_tensors(tmp_path / "sd15-base.safetensors", {
        "model.diffusion_model.input_blocks.0.0.weight": torch.randn(32, 4, 3, 3, generator=g),
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.randn(32, 768, generator=g),
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": torch.randn(16, 768, generator=g),
    }, {"format": "pt"})
    line = fuse_fails((tmp_path, assets.root), base, "--lightning", "4", "--lightning-dir", assets.lightning_dir,
                      "-o", tmp_path / "o.safetensors", names="sd15-base.safetensors")
    assert "Stable Diffusion 1.x" in line


@pytest.mark.slow
def test_v_prediction_base_warns_and_fuses(assets: FuseAssets, tmp_path: Path) -> None:
    tensors = load_tensors(assets.base)
    tensors["v_pred"] = torch.zeros(0, dtype=torch.int64)  # the marker key of v-prediction SDXL checkpoints
    base = save_tensors(tmp_path / "vpred.safetensors", tensors, {"format": "pt"})
    out = tmp_path / "vpred-lightning.safetensors"
    result = fuse_ok(base, "--lightning", "4", "--lightning-dir", assets.lightning_dir, "-o", out)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Warning: ") and "v_prediction" in lines[0], result.stderr
    assert "vpred.safetensors" in lines[0]
    assert "v_pred" in read_header(out).tensors  # the marker stays: loaders still see a v-pred model
    assert record_of(out)["lightning_steps"] == 4


def test_dry_run_prints_the_plan_and_writes_nothing(assets: FuseAssets, tmp_path: Path) -> None:
    inputs = (assets.base, assets.lightning_lora, assets.style)  # built on first use: build them before the listing
    before = listing(assets.root)
    assert all(str(p.relative_to(assets.root)) in before for p in inputs)
    out = tmp_path / "dry.safetensors"
    result = fuse_ok(assets.base, "--lightning", "4", "--lightning-dir", assets.lightning_dir, "--lora",
                     f"{assets.style}:0.6", "--save", "checkpoint", "--save", "unet", "-o", out, "--dry-run")
    text = result.stdout
    assert f"LoRA:    {assets.lightning_lora} (kohya-diffusers, {n_targets('lightning')} modules matched, 0 unmatched, strength 1)" in text
    assert f"LoRA:    {assets.style} (kohya, {n_targets('attn', ALL_TE)} modules matched, 0 unmatched, strength 0.6)" in text
    blocks = text.split("Modules per block:\n", 1)[1]
    counts = [int(m.group(3)) for m in re.finditer(r"^  ([A-Z0-9]+)\s+(\S+:\S+)\s+(\d+)$", blocks, re.M)]
    assert sum(counts) == n_targets("lightning") + n_targets("attn", ALL_TE)
    assert re.search(r"^  IN04\s+unet:input_blocks\.4\s+\d+$", blocks, re.M)
    assert re.search(r"^  TE2\s+te2:\S+\s+\d+$", blocks, re.M)
    n_tensors = len(read_header(assets.base).tensors)
    assert f"Tensors patched: {len(patched_keys())} of {n_tensors}" in text
    assert f"Output:  {out} (checkpoint, about " in text
    assert f"Output:  {tmp_path / 'dry-unet.safetensors'} (unet, about " in text
    assert re.search(r"^Predicted peak memory: about [\d.]+ (KiB|MiB|GiB|TiB)$", text, re.M)
    assert "Sampler: EulerDiscreteScheduler, timestep_spacing=trailing, 4 steps" in text
    assert text.rstrip().endswith("Dry run: nothing was written.")
    assert result.stderr == ""
    assert list(tmp_path.iterdir()) == []
    assert listing(assets.root) == before


_UNITS = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}


def test_dry_run_predicted_peak_memory_is_plausible(assets: FuseAssets, tmp_path: Path) -> None:
    from lora_tools.engine.pipeline import MAX_INFLIGHT_BYTES

    result = fuse_ok(assets.base, "--lightning", "4", "--lightning-dir", assets.lightning_dir,
                     "-o", tmp_path / "dry.safetensors", "--dry-run")
    m = re.search(r"^Predicted peak memory: about ([\d.]+) (B|KiB|MiB|GiB|TiB)$", result.stdout, re.M)
    assert m is not None
    predicted = float(m.group(1)) * _UNITS[m.group(2)]
    # runtime + read-ahead and write-behind budgets + buffer pool + a tensor of a ~100 MB model:
    # well under 1 GB, and not growing with the model (the full-size benchmark measures ~850 MB)
    assert 2 * MAX_INFLIGHT_BYTES <= predicted < (1 << 30)


def test_same_lora_twice_needs_force(assets: FuseAssets, tmp_path: Path) -> None:
    line = fuse_fails((tmp_path, assets.root), assets.base, "--lora", assets.style, "--lora", f"{assets.style}:0.5",
                      "-o", tmp_path / "o.safetensors", names="style.safetensors")
    assert "given twice" in line and "--force" in line


@pytest.mark.slow
def test_overflow_while_streaming_leaves_nothing(assets: FuseAssets, tmp_path: Path) -> None:
    """Finite factors whose product overflows fp32 in the middle of the stream: the half-written file must go away."""
    tensors, meta = make_lora("tiny", fmt="kohya-sgm", targets="attn", rank=4, alpha=4.0, seed=8)
    key = sorted(k for k in tensors if k.startswith("lora_unet_output_blocks_1") and k.endswith("lora_up.weight"))[0]
    tensors[key] *= 1e20
    tensors[key.replace("lora_up", "lora_down")] *= 1e20
    lora = save_tensors(tmp_path / "huge.safetensors", tensors, meta)
    line = fuse_fails((tmp_path, assets.root), assets.base, "--lora", lora, "-o", tmp_path / "inf.safetensors",
                      names="model.diffusion_model.output_blocks.1.")
    assert "NaN/Inf" in line and "nothing was written" in line


def test_strength_beyond_float32_is_a_clean_error(assets: FuseAssets, tmp_path: Path) -> None:
    line = fuse_fails((tmp_path, assets.root), assets.base, "--lora", f"{assets.style}:1e300",
                      "-o", tmp_path / "o.safetensors", names="style.safetensors")
    assert "strength" in line


def test_fp16_overflow_is_refused(assets: FuseAssets, tmp_path: Path) -> None:
    # |delta| reaches ~1e5 here: finite in fp32, Inf in fp16
    fuse_fails((tmp_path, assets.root), assets.base, "--lora", f"{assets.style}:1e7", "--dtype", "fp16",
               "-o", tmp_path / "inf16.safetensors", names="")


@pytest.mark.slow
def test_output_onto_the_original_unet_is_refused(assets: FuseAssets, tmp_path: Path) -> None:
    original = tmp_path / "original-unet.safetensors"
    original.write_bytes(assets.original_unet.read_bytes())
    fuse_fails((tmp_path, assets.root), assets.base, "--lightning", "4", "--method", "unet", "--lightning-dir",
               assets.unet_dir, "--original-unet", original, "--save", "unet", "-o", original, "--overwrite",
               names="original-unet.safetensors")


@pytest.mark.slow
def test_overflow_scan_is_skipped_only_where_the_factors_rule_it_out(assets: FuseAssets, tmp_path: Path) -> None:
    """The patcher skips its NaN/Inf scan when ``rank * max|up| * max|down|`` bounds the delta far
    below the output dtype's range; large strengths and dtype changes keep the scan."""
    from lora_tools.engine import needs_check
    from lora_tools.ops.fuse import fuse_patches
    from lora_tools.ops.fuse_plan import plan_fuse

    def scans(loras: list[tuple[str, float]], dtype: str) -> set[bool]:
        plan = plan_fuse(assets.base, loras=loras, output=tmp_path / "o.safetensors", dtype=dtype)
        try:
            refs = [r for r in plan.base.refs if r.key in plan.patched_keys()]
            patches = fuse_patches(plan)
            return {needs_check(patches[r.key], torch_dtype(r.dtype), torch_dtype(plan.output_dtype(r.dtype)))
                    for r in refs}
        finally:
            plan.close()

    assert scans([(str(assets.lightning_lora), 1.0), (str(assets.style), 0.6)], "keep") == {False}
    assert scans([(str(assets.style), 1000.0)], "keep") == {False}  # fp32 has room to spare
    assert scans([(str(assets.style), 1.0)], "fp16") == {True}  # cast from the fp32 base: always scanned
    tensors, meta = make_lora("tiny", fmt="kohya-sgm", targets="attn", rank=4, alpha=4.0, seed=8)
    huge = save_tensors(tmp_path / "huge.safetensors", {k: v * 1e18 for k, v in tensors.items()}, meta)
    assert scans([(str(huge), 1.0)], "keep") == {True}  # bound ~1e36: beyond what the rule vouches for


# ---------------------------------------------------------------------------- presets and parameter hints


def test_library_error_names_the_parameter_and_the_cli_the_flag(assets: FuseAssets, tmp_path: Path) -> None:
    from lora_tools.cli import error_message
    from lora_tools.errors import OutputExistsError
    from lora_tools.ops.fuse_plan import plan_fuse

    out = tmp_path / "exists.safetensors"
    out.write_bytes(b"an older file")
    with pytest.raises(OutputExistsError) as info:
        plan_fuse(assets.base, "lightning-4step", preset_dir=assets.lightning_dir, output=out)
    message = str(info.value)
    assert "overwrite=True" in message and "exists.safetensors" in message
    assert not re.search(r"(^|\s)--?[a-z]", message), message  # no CLI flag in the library's message
    assert "--overwrite" in error_message(info.value)
    line = fuse_fails((tmp_path, assets.root), assets.base, "--preset", "lightning-4step", "--preset-dir",
                      assets.lightning_dir, "-o", out, names="exists.safetensors")
    assert "--overwrite" in line and "overwrite=True" not in line
    assert out.read_bytes() == b"an older file"


@pytest.mark.slow  # over a second on a quiet machine: full selection
def test_preset_equals_the_lightning_shorthand_and_the_deprecated_keywords(assets: FuseAssets, tmp_path: Path) -> None:
    by_name, by_steps = tmp_path / "by-name.safetensors", tmp_path / "by-steps.safetensors"
    result = fuse_ok(assets.base, "--preset", "lightning-4step", "--preset-dir", assets.lightning_dir, "-o", by_name)
    fuse_ok(assets.base, "--lightning", "4", "--lightning-dir", assets.lightning_dir, "-o", by_steps, "-q")
    assert tensor_bytes(by_name) == tensor_bytes(by_steps)
    record = record_of(by_name)
    assert record["preset"] == "lightning-4step" and record["lightning_steps"] == 4  # old readers keep working
    assert record["sampler"] == LIGHTNING_SAMPLER
    assert read_header(by_name).metadata["modelspec.title"].endswith("Lightning 4-step")
    digests = re.findall(r"sha256 ([0-9a-f]+), AutoV2 ([0-9a-f]+)", result.stdout)
    assert digests == [(sha256_of(by_name), sha256_of(by_name)[:10])]  # the full sha256
    assert "  ComfyUI:   KSampler sampler=euler scheduler=sgm_uniform steps=4 cfg=1.0" in result.stdout
    with pytest.warns(DeprecationWarning, match="preset_dir"):
        fuse(assets.base, lightning=4, lightning_dir=assets.lightning_dir, output=tmp_path / "old.safetensors")
    assert tensor_bytes(tmp_path / "old.safetensors") == tensor_bytes(by_steps)


@pytest.mark.parametrize("strength", ["0.5", "nan"])
def test_strength_without_a_preset_is_a_usage_error(assets: FuseAssets, tmp_path: Path, strength: str) -> None:
    line = fuse_fails((tmp_path, assets.root), assets.base, "--lora", assets.style, "--strength", strength,
                      "-o", tmp_path / "o.safetensors", names="--strength")
    assert "--preset" in line


def test_preset_strength_out_of_range_and_conflicting_presets_are_refused(assets: FuseAssets, tmp_path: Path) -> None:
    line = fuse_fails((tmp_path, assets.root), assets.base, "--lightning", "4", "--lightning-dir", assets.lightning_dir,
                      "--strength", "nan", "-o", tmp_path / "o.safetensors", names="strength")
    assert "out of range" in line
    line = fuse_fails((tmp_path, assets.root), assets.base, "--lightning", "4", "--preset", "lightning-8step",
                      "-o", tmp_path / "o.safetensors", names="lightning-8step")
    line = fuse_fails((tmp_path, assets.root), assets.base, "--preset", "lightning-3step", "-o", tmp_path / "o.safetensors",
                      names="lightning-3step")
    assert "Unknown preset" in line


def test_a_preset_recorded_by_name_is_not_fused_twice(tmp_path: Path) -> None:
    from lora_tools.errors import UsageError
    from lora_tools.ops.fuse_plan import plan_fuse
    from lora_tools.testing.synthetic import write_checkpoint

    base = write_checkpoint(tmp_path / "accelerated.safetensors", "tiny", dtype="fp16",
                            metadata={"loratool": json.dumps({"operation": "fuse", "preset": "hyper-sd-8step"})})
    with pytest.raises(UsageError, match="already has hyper-sd-8step fused into it") as info:
        plan_fuse(base, "lightning-4step", output=tmp_path / "o.safetensors")
    assert "force=True" in str(info.value)


def test_default_stem_names_the_preset() -> None:
    from lora_tools.ops.fuse_plan import default_stem
    from lora_tools.presets import AccelerationPreset, get_preset

    lightning = get_preset("lightning-4step")
    other = dataclasses.replace(lightning, name="hyper-sd-8step", family="hyper-sd", steps=8)
    assert default_stem(Path("/m/juggernaut.safetensors"), lightning, [], "lora") == "juggernaut-lightning-4step"
    assert default_stem(Path("/m/juggernaut.safetensors"), lightning, [], "unet") == "juggernaut-lightning-4step-unetdiff"
    assert default_stem(Path("/m/juggernaut.safetensors"), other, [], "lora") == "juggernaut-hyper-sd-8step"
    assert isinstance(other, AccelerationPreset)


# ---------------------------------------------------------------------------- round 2: integrity, space, advice


def test_summary_lists_every_weights_file_of_a_diffusers_folder(runs: SimpleNamespace) -> None:
    out = runs.keep_result.stdout
    for rel in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
                "text_encoder_2/model.safetensors", "vae/diffusion_pytorch_model.safetensors"):
        path = runs.diffusers / rel
        assert f"Wrote {path} (" in out and f"sha256 {sha256_of(path)}," in out, (rel, out)


def _corrupt_before_the_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flip the last data byte of every output after it is written, before it is read back."""
    original = StreamingWriter._check_written

    def corrupt_then_check(self: StreamingWriter) -> None:
        assert self._tmp is not None
        with open(self._tmp, "r+b") as f:
            f.seek(-1, 2)
            last = f.read(1)
            f.seek(-1, 2)
            f.write(bytes([last[0] ^ 0xFF]))
        original(self)

    monkeypatch.setattr(StreamingWriter, "_check_written", corrupt_then_check)


@pytest.mark.slow  # over a second on a quiet machine: full selection
def test_verify_output_rehashes_the_data_before_the_rename(assets: FuseAssets, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    args = (assets.base, "--lora", assets.style, "-q")
    ok = tmp_path / "verified.safetensors"
    fuse_ok(*args, "--verify-output", "-o", ok)
    check = CliRunner().invoke(cli, ["check", str(ok)])
    assert check.exit_code == 0, check.output
    _corrupt_before_the_check(monkeypatch)
    unchecked = tmp_path / "unchecked.safetensors"
    fuse_ok(*args, "-o", unchecked)  # the header check alone cannot see a flipped data byte
    assert sha256_of(unchecked) != sha256_of(ok)
    out = tmp_path / "out" / "bad.safetensors"
    (tmp_path / "out").mkdir()
    line = fuse_fails((tmp_path / "out", assets.root), *args, "--verify-output", "-o", out, names=str(out))
    assert line == f"Error: cannot write '{out}': its data read back differs from what was written."


@pytest.mark.slow
def test_not_enough_space_is_refused_at_plan_time(assets: FuseAssets, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil as shutil_module

    from lora_tools.io import atomic
    from lora_tools.ops.fuse_plan import plan_fuse
    from lora_tools.units import format_bytes

    plan = plan_fuse(assets.base, loras=[(str(assets.style), 1.0)], saves=("checkpoint", "unet"),
                     output=tmp_path / "o.safetensors")
    try:
        need = plan.output_bytes("checkpoint") + plan.output_bytes("unet")
    finally:
        plan.close()
    free = need - 1  # room for each output alone, not for both
    usage = shutil_module.disk_usage(tmp_path)
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda path: usage._replace(free=free))
    out = tmp_path / "o.safetensors"
    line = fuse_fails((tmp_path, assets.root), assets.base, "--lora", assets.style, "--save", "checkpoint",
                      "--save", "unet", "-o", out, "--dry-run", names="not enough space")
    mount = atomic.mount_point(tmp_path)
    assert line == (f"Error: not enough space on '{mount}' for '{tmp_path / 'o-unet.safetensors'}': "
                    f"need {format_bytes(need)}, have {format_bytes(free)}.")
    fuse_ok(assets.base, "--lora", assets.style, "-o", out, "--dry-run")  # one output fits


@pytest.mark.slow
def test_base_warnings_name_the_preset(assets: FuseAssets, tmp_path: Path) -> None:
    from lora_tools.presets import get_preset

    tensors = load_tensors(assets.base)
    key = "model.diffusion_model.input_blocks.0.0.weight"
    tensors[key] = torch.zeros(tensors[key].shape[0], 9, *tensors[key].shape[2:], dtype=tensors[key].dtype)
    base = save_tensors(tmp_path / "inpaint.safetensors", tensors, {"format": "pt"})
    label = get_preset("lightning-4step").label
    result = fuse_ok(base, "--lightning", "4", "--lightning-dir", assets.lightning_dir, "-o", tmp_path / "o.safetensors",
                     "--dry-run")
    assert result.stderr.splitlines() == [
        f"Warning: '{base}' is an SDXL inpainting model (9-channel input); {label} was distilled from the 4-channel "
        "SDXL base, so results may differ from the model card."]
    # a Lightning LoRA passed with --lora is recognised, and the warning names it too
    result = fuse_ok(base, "--lora", assets.lightning_lora, "-o", tmp_path / "o.safetensors", "--dry-run")
    assert f"{label} was distilled from" in result.stderr.splitlines()[0]


def test_method_unet_offline_advice_names_the_preset_folder(assets: FuseAssets, tmp_path: Path, offline_hub: Path) -> None:
    line = fuse_fails((tmp_path, assets.root), assets.base, "--lightning", "4", "--method", "unet",
                      "-o", tmp_path / "x.safetensors", names="sdxl_lightning_4step_unet.safetensors")
    assert line.endswith("; pass --preset-dir DIR naming a folder that holds the downloaded file."), line
    assert "--lora" not in line


def test_method_unet_of_a_preset_without_a_unet_file_is_refused(assets: FuseAssets, tmp_path: Path) -> None:
    # dmd2-4step ships only a LoRA: a UNet difference has no file to read (was an internal TypeError)
    line = fuse_fails((tmp_path, assets.root), assets.base, "--preset", "dmd2-4step", "--method", "unet",
                      "--preset-dir", tmp_path, "-o", tmp_path / "x.safetensors", names="dmd2-4step")
    assert line == "Error: The preset dmd2-4step ships no UNet file to fuse; pass --method lora to fuse its LoRA.", line
