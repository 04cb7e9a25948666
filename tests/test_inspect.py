"""``loratool inspect`` end to end (CliRunner), on synthetic LoRAs and checkpoints of every layout."""

from __future__ import annotations

import hashlib
import json
import math
import struct
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import lora_tools
from lora_tools.cli import cli
from lora_tools.io.safetensors import TensorPlan, build_header, read_header, save_tensors
from lora_tools.layouts import FULL, SGM_PREFIXES, TINY
from lora_tools.testing.synthetic import write_checkpoint, write_diffusers_folder, write_unet_file
from lora_tools.testing.synthetic_lora import make_lora, module_keys, select_targets, write_lightning_lora, write_lora

LIGHTNING_NAME = "sdxl_lightning_4step_lora.safetensors"


def run_inspect(*args: str | Path) -> str:
    result = CliRunner().invoke(cli, ["inspect", *map(str, args)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    return result.stdout


def inspect_json(path: Path, *args: str) -> dict:
    return json.loads(run_inspect(path, "--json", *args))


def n_targets(targets: str, components=("unet",), cfg=TINY) -> int:
    return len(select_targets(cfg, targets, components))  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def lora_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("loras")


@pytest.fixture(scope="session")
def lightning_tiny(lora_dir: Path) -> Path:
    return write_lightning_lora(lora_dir / LIGHTNING_NAME, "tiny")


@pytest.fixture(scope="session")
def ckpt_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="session")
def tiny_ckpt(ckpt_dir: Path) -> Path:
    return write_checkpoint(ckpt_dir / "tiny.safetensors", "tiny")


@pytest.fixture(scope="session")
def pipeline_folder(ckpt_dir: Path) -> Path:
    return write_diffusers_folder(ckpt_dir / "pipeline", "tiny")


# ----------------------------------------------------------------------------- LoRA formats

# (id, write_lora kwargs, detected format, algorithm histogram as {name: predicate on target}, rank, alpha label)
FORMAT_CASES = [
    ("kohya-diffusers", dict(fmt="kohya-diffusers", rank=4, alpha=2.0), "kohya-diffusers", "diffusers", "2", "0.5"),
    ("kohya-sgm", dict(fmt="kohya-sgm", rank=4, alpha=1.0, components=("unet", "te1", "te2")), "kohya", "sgm", "1", "0.25"),
    ("comfy", dict(fmt="comfy", rank=8, alpha=4.0), "comfy", "sgm", "4", "0.5"),
    ("diffusers", dict(fmt="diffusers", rank=4, alpha=8.0, components=("unet", "te1")), "diffusers", "diffusers", "8", "2"),
    ("peft", dict(fmt="peft", rank=4), "peft", "diffusers", "none", "1"),
    ("diffusers-legacy", dict(fmt="diffusers-legacy", rank=4), "diffusers-legacy", "diffusers", "none", "1"),
    ("loha", dict(fmt="kohya-diffusers", algorithm="loha", rank=4, alpha=4.0), "kohya-diffusers", "diffusers", "4", "1"),
    ("lokr", dict(fmt="kohya-diffusers", algorithm="lokr", rank=4, alpha=2.0), "kohya-diffusers", "diffusers", "2", "0.5"),
    ("dora", dict(fmt="kohya-diffusers", algorithm="dora", rank=4, alpha=4.0), "kohya-diffusers", "diffusers", "4", "1"),
]
ALGORITHM = {"loha": "loha", "lokr": "lokr", "dora": "dora"}


@pytest.mark.parametrize("case", FORMAT_CASES, ids=[c[0] for c in FORMAT_CASES])
def test_inspect_json_per_format(lora_dir: Path, case: tuple) -> None:
    name, kwargs, fmt, naming, alpha, scale = case
    path = write_lora(lora_dir / f"{name}.safetensors", "tiny", **kwargs)
    rank = kwargs["rank"]
    components = kwargs.get("components", ("unet",))
    n = n_targets("attn", components)

    d = inspect_json(path)

    assert d["schema"] == 1 and d["kind"] == "lora" and d["checkpoint"] is None
    lora = d["lora"]
    assert lora["format"] == fmt
    assert lora["layout"] == "sdxl-tiny"
    assert lora["modules"] == n
    assert lora["modules_per_component"] == {c: n_targets("attn", (c,)) if c in components else 0
                                             for c in ("unet", "te1", "te2")}
    assert lora["unet_naming"] == naming
    assert lora["algorithms"] == {ALGORITHM.get(name, "lora"): n}
    assert lora["ranks"] == {str(rank): n}
    assert lora["alphas"] == {alpha: n}
    assert lora["scales"] == {scale: n}
    assert lora["unmatched"] == {"count": 0, "first": [], "hint": None}
    assert lora["acceleration"] is None
    # 2 transformer blocks x (attn1 + attn2) x (q, k, v, out) in the first attention level
    assert lora["modules_per_block"]["unet"]["input_blocks.4"] == 16
    assert sum(sum(b.values()) for b in lora["modules_per_block"].values()) == n
    header = read_header(path)
    assert d["tensors"] == len(header.tensors)
    assert d["dtypes"] == {"F32": len(header.tensors)}
    alpha_numel = sum(1 for k in header.tensors if k.endswith(".alpha"))
    assert d["parameters"] == sum(t.numel for t in header.tensors.values()) - alpha_numel
    assert d["file"]["size_bytes"] == path.stat().st_size
    if "te1" in components:
        assert "CLIP-L text encoder" in lora["applies_to"]
    else:
        assert lora["applies_to"].endswith("(UNet); text encoders untouched")


@pytest.mark.slow
def test_inspect_locon_tucker(lora_dir: Path) -> None:
    path = write_lora(lora_dir / "locon_tucker.safetensors", "tiny", fmt="kohya-diffusers", algorithm="lora-tucker",
                      targets="lightning", rank=4, alpha=4.0)
    targets = select_targets(TINY, "lightning")
    tucker = sum(1 for t in targets if len(t.shape) == 4 and t.shape[2] > 1)
    lora = inspect_json(path)["lora"]
    assert lora["algorithms"] == {"lora": len(targets) - tucker, "lora-tucker": tucker}
    assert tucker > 0
    assert lora["ranks"] == {"4": len(targets)}
    assert lora["acceleration"] is None  # a Tucker core is not the Lightning signature


@pytest.mark.slow
def test_pickled_lora_read_with_weights_only(lora_dir: Path) -> None:
    tensors, _ = make_lora("tiny", fmt="kohya-diffusers", rank=2, alpha=1.0)
    path = lora_dir / "legacy_lora.pt"
    torch.save(tensors, path)
    d = inspect_json(path)
    assert d["file"]["container"] == "pickle"
    assert d["lora"]["format"] == "kohya-diffusers"
    assert d["lora"]["ranks"] == {"2": n_targets("attn")}


# ----------------------------------------------------------------------------- Lightning


def test_lightning_tiny_identified_by_file_name(lightning_tiny: Path) -> None:
    targets = select_targets(TINY, "lightning")
    want_ranks = Counter(64 for _ in targets)  # like the real file: rank 64 everywhere, even on 32-wide tiny layers

    lora = inspect_json(lightning_tiny)["lora"]

    assert lora["format"] == "kohya-diffusers" and lora["unet_naming"] == "diffusers" and lora["layout"] == "sdxl-tiny"
    assert lora["modules_per_component"] == {"unet": len(targets), "te1": 0, "te2": 0}
    assert lora["ranks"] == {str(r): n for r, n in sorted(want_ranks.items())}
    assert max(int(r) for r in lora["ranks"]) == 64
    assert lora["alphas"] == {"8": len(targets)}
    accel = lora["acceleration"]
    assert accel["label"] == "Lightning 4-step"
    assert accel["preset"] == "lightning-4step" and accel["steps"] == 4 and accel["family"] == "lightning"
    assert accel["identified_by"] == "filename"
    assert accel["key_signature"] is True
    assert accel["sampler"]["steps"] == 4 and accel["sampler"]["guidance_scale"] == 0.0
    assert accel["sampler"]["timestep_spacing"] == "trailing"
    assert "eps-prediction" in lora["applies_to"]


@pytest.mark.slow
def test_lightning_shaped_without_name_has_unknown_steps(lora_dir: Path, lightning_tiny: Path) -> None:
    anon = lora_dir / "some_accelerator.safetensors"
    anon.write_bytes(lightning_tiny.read_bytes())
    accel = inspect_json(anon)["lora"]["acceleration"]
    assert accel["label"] == "lightning/lcm/dmd2-shaped"
    assert accel["steps"] is None and accel["preset"] is None and accel["family"] is None
    assert accel["identified_by"] == "keys" and accel["key_signature"] is True
    assert "step count cannot be read from keys" in accel["note"]


def test_lightning_signature_needs_alpha_everywhere(lora_dir: Path) -> None:
    path = write_lora(lora_dir / "lightning_set_no_alpha.safetensors", "tiny", fmt="kohya-diffusers",
                      targets="lightning", rank=64, alpha=None)
    assert inspect_json(path)["lora"]["acceleration"] is None


def test_lightning_signature_needs_the_whole_module_set(lora_dir: Path, lightning_tiny: Path) -> None:
    tensors, meta = make_lora("tiny", fmt="kohya-diffusers", targets="lightning", rank=64, alpha=8.0, dtype="fp16")
    dropped = "lora_unet_up_blocks_0_upsamplers_0_conv"
    tensors = {k: v for k, v in tensors.items() if not k.startswith(dropped + ".")}
    path = save_tensors(lora_dir / "lightning_minus_one.safetensors", tensors, meta)
    lora = inspect_json(path)["lora"]
    assert lora["modules"] == n_targets("lightning") - 1
    assert lora["acceleration"] is None


def test_lightning_identified_by_metadata_and_metadata_summary(lora_dir: Path) -> None:
    tensors, meta = make_lora("tiny", fmt="kohya-diffusers", rank=4, alpha=4.0)
    meta.update({
        "ss_output_name": "sdxl_lightning_8step_lora", "ss_network_module": "networks.lora",
        "ss_network_dim": "4", "ss_network_alpha": "4.0", "ss_base_model_version": "sdxl_base_v1-0",
        "ss_tag_frequency": "{" + "x" * 500 + "}", "modelspec.title": "My LoRA", "long_key": "y" * 300,
    })
    path = save_tensors(lora_dir / "renamed.safetensors", tensors, meta)
    d = inspect_json(path)
    accel = d["lora"]["acceleration"]
    assert accel["label"] == "Lightning 8-step" and accel["identified_by"] == "metadata"
    assert accel["key_signature"] is False
    md = d["metadata"]
    assert md["kohya"] == {"ss_output_name": "sdxl_lightning_8step_lora", "ss_network_module": "networks.lora",
                           "ss_network_dim": "4", "ss_network_alpha": "4.0",
                           "ss_base_model_version": "sdxl_base_v1-0"}
    assert md["kohya_other_keys"] == ["ss_tag_frequency"]
    assert md["modelspec"] == {"modelspec.title": "My LoRA"}
    assert md["other"]["format"] == "pt"
    assert md["other"]["long_key"] == "y" * 200 + "... (300 chars)"


@pytest.mark.slow
def test_hashes_and_identification_by_sha256(lora_dir: Path, lightning_tiny: Path, monkeypatch) -> None:
    d = inspect_json(lightning_tiny)
    digest = hashlib.sha256(lightning_tiny.read_bytes()).hexdigest()
    assert d["file"]["sha256"] == digest and d["file"]["autov2"] == digest[:10]
    assert inspect_json(lightning_tiny, "--no-hash")["file"]["sha256"] is None

    import lora_tools.io.hashing
    from lora_tools.presets import LIGHTNING

    known = LIGHTNING[4].known_sha256["sdxl_lightning_4step_lora.safetensors"]
    monkeypatch.setattr(lora_tools.io.hashing, "sha256_file", lambda path, **_: known)
    anon = lora_dir / "downloaded.safetensors"
    anon.write_bytes(lightning_tiny.read_bytes())
    accel = inspect_json(anon)["lora"]["acceleration"]
    assert accel["identified_by"] == "sha256" and accel["steps"] == 4


def write_lightning_header_only(path: Path, cfg, *, rank: int = 64, alpha: float = 8.0) -> Path:
    """A Lightning-shaped LoRA whose factor tensors are a sparse hole of zeros: the header (keys,
    dtypes, shapes, offsets) and the alpha values are real, writing takes milliseconds."""
    plans = []
    for t in select_targets(cfg, "lightning"):
        out, fan_in = t.shape[0], math.prod(t.shape[1:])
        r = rank
        conv = len(t.shape) == 4
        keys, alpha_key = module_keys(t, "kohya-diffusers", "lora")
        plans.append(TensorPlan(keys["down"], "F16", (r, *t.shape[1:]) if conv else (r, fan_in)))
        plans.append(TensorPlan(keys["up"], "F16", (out, r, 1, 1) if conv else (out, r)))
        plans.append(TensorPlan(alpha_key, "F16", ()))
    header, ordered = build_header(plans, {"format": "pt"})
    offset = 0
    with open(path, "wb") as f:
        f.write(header)
        for p in ordered:
            if p.name.endswith(".alpha"):
                f.seek(len(header) + offset)
                f.write(struct.pack("<e", alpha))
            offset += p.nbytes
        f.truncate(len(header) + offset)
    return path


def test_header_only_builder_matches_the_synthetic_writer(lora_dir: Path, lightning_tiny: Path) -> None:
    fake = read_header(write_lightning_header_only(lora_dir / "tiny_header_only.safetensors", TINY))
    real = read_header(lightning_tiny)
    assert {k: (t.dtype, t.shape) for k, t in fake.tensors.items()} == \
        {k: (t.dtype, t.shape) for k, t in real.tensors.items()}
    assert fake.file_size == real.file_size


def test_full_size_lightning_shaped_lora(tmp_path: Path) -> None:
    """The real file's shape (ByteDance/SDXL-Lightning's sdxl_lightning_4step_lora.safetensors): 788 UNet modules, rank 64, alpha 8, ~393.9 MB fp16."""
    path = write_lightning_header_only(tmp_path / "lcm_lora_sdxl.safetensors", FULL)
    d = inspect_json(path, "--no-hash")
    lora = d["lora"]
    assert lora["layout"] == "sdxl"
    assert lora["modules_per_component"] == {"unet": 788, "te1": 0, "te2": 0}
    assert lora["modules"] == n_targets("lightning", cfg=FULL) == 788
    assert lora["ranks"] == {"64": 788} and lora["alphas"] == {"8": 788} and lora["scales"] == {"0.125": 788}
    assert d["tensors"] == 2364 and d["dtypes"] == {"F16": 2364}
    assert d["parameters"] == 196_751_360
    assert 393.5e6 < d["file"]["size_bytes"] < 394.5e6
    assert lora["acceleration"]["label"] == "lightning/lcm/dmd2-shaped"
    assert lora["acceleration"]["key_signature"] is True
    assert lora["applies_to"].startswith("SDXL 1.0 base and checkpoints derived from it (UNet); text encoders untouched")
    blocks = lora["modules_per_block"]["unet"]
    assert blocks["middle_block"] == 10 * 10 + 2 + 2 * 3  # 10 transformer blocks, proj_in/out, 2 resnets
    assert sum(blocks.values()) == 788
    assert "input_blocks.0" not in blocks and "out" not in blocks  # conv_in / conv_out are not targets


@pytest.mark.slow
@pytest.mark.large  # ~394 MB in tmp_path, removed when it passes
def test_full_size_lightning_lora_written_for_real(tmp_path: Path) -> None:
    """The same facts on a file written with real random factors (~394 MB, a few seconds)."""
    path = write_lightning_lora(tmp_path / "lcm_lora_sdxl.safetensors", "full")
    d = inspect_json(path, "--no-hash")
    assert d["lora"]["modules"] == 788 and d["lora"]["ranks"] == {"64": 788} and d["lora"]["alphas"] == {"8": 788}
    assert d["parameters"] == 196_751_360


# ----------------------------------------------------------------------------- checkpoints


def test_tiny_checkpoint(tiny_ckpt: Path) -> None:
    d = inspect_json(tiny_ckpt)
    header = read_header(tiny_ckpt)
    c = d["checkpoint"]
    assert d["kind"] == "checkpoint" and d["lora"] is None
    assert c["layout"] == "sgm" and c["architecture"] == "sdxl-base"
    assert c["supported"] is True and c["why_unsupported"] is None
    assert set(c["components"]) == {"unet", "vae", "te1", "te2"}
    for comp, summary in c["components"].items():
        mine = [t for k, t in header.tensors.items() if k.startswith(SGM_PREFIXES[comp])]
        assert summary["parameters"] == sum(t.numel for t in mine), comp
        assert summary["tensors"] == len(mine)
    assert d["parameters"] == sum(t.numel for t in header.tensors.values())
    assert c["prediction"] == "epsilon" and c["prediction_source"] == "default"
    assert c["markers"] == [] and c["extra_keys"] == [] and c["provenance"] is None
    assert c["components"]["te1"]["dtypes"] == {"F16": 196, "I64": 1}  # position_ids


def test_vpred_checkpoint(ckpt_dir: Path) -> None:
    path = write_checkpoint(ckpt_dir / "vpred.safetensors", "tiny", components=("unet",), markers=("v_pred", "ztsnr"))
    c = inspect_json(path)["checkpoint"]
    assert c["prediction"] == "v_prediction" and c["prediction_source"] == "markers"
    assert c["markers"] == ["v_pred", "ztsnr"] and c["extra_keys"] == ["v_pred", "ztsnr"]
    assert list(c["components"]) == ["unet"]
    assert any("eps-prediction" in w for w in c["warnings"])


def test_fused_checkpoint_provenance(ckpt_dir: Path) -> None:
    record = {
        "version": "0.1.0", "operation": "fuse", "method": "lora", "lightning_steps": 4,
        "sources": [{"role": "base", "name": "juggernaut.safetensors", "sha256": "0" * 64},
                    {"role": "lora", "name": LIGHTNING_NAME, "sha256": "1" * 64, "strength": 1.0,
                     "preset": "lightning-4step"}],
        "sampler": {"scheduler": "EulerDiscreteScheduler", "timestep_spacing": "trailing", "steps": 4,
                    "guidance_scale": 0.0, "prediction_type": "epsilon", "comfy_sampler": "euler",
                    "comfy_scheduler": "sgm_uniform", "comfy_cfg": 1.0},
    }
    path = write_checkpoint(ckpt_dir / "fused.safetensors", "tiny", components=("unet",),
                            metadata={"loratool": json.dumps(record), "modelspec.title": "Juggernaut Lightning 4"})
    d = inspect_json(path)
    p = d["checkpoint"]["provenance"]
    assert p["operation"] == "fuse" and p["lightning_steps"] == 4
    assert p["fused"] == [{"name": LIGHTNING_NAME, "strength": 1.0, "preset": "lightning-4step"}]
    assert p["sampler"]["steps"] == 4 and p["record"] == record
    assert d["checkpoint"]["acceleration"]["steps"] == 4
    assert d["metadata"]["modelspec"] == {"modelspec.title": "Juggernaut Lightning 4"}
    assert "loratool" not in d["metadata"]["other"]
    text = run_inspect(path)
    assert "fuse: sdxl_lightning_4step_lora.safetensors x1.0 (lightning-4step)" in text
    assert "EulerDiscreteScheduler, timestep_spacing=trailing, 4 steps" in text


def test_diffusers_folder(pipeline_folder: Path) -> None:
    root = pipeline_folder
    d = inspect_json(root)
    c = d["checkpoint"]
    assert d["file"]["container"] == "diffusers-folder" and d["file"]["sha256"] is None
    assert c["layout"] == "diffusers-folder" and c["pipeline"] == "StableDiffusionXLPipeline"
    assert c["architecture"] == "sdxl-base" and c["supported"] is True
    assert set(c["components"]) == {"unet", "vae", "te1", "te2"}
    assert c["components"]["unet"]["files"] == ["unet/diffusion_pytorch_model.safetensors"]
    unet = read_header(root / "unet" / "diffusion_pytorch_model.safetensors")
    assert c["components"]["unet"]["parameters"] == sum(t.numel for t in unet.tensors.values())
    assert c["prediction"] == "epsilon" and c["prediction_source"] == "scheduler_config"


def test_diffusers_unet_file(ckpt_dir: Path) -> None:
    path = write_unet_file(ckpt_dir / "unet.safetensors", "tiny")
    c = inspect_json(path)["checkpoint"]
    assert c["layout"] == "diffusers-unet" and c["architecture"] == "sdxl-base"
    assert list(c["components"]) == ["unet"]
    assert c["components"]["unet"]["tensors"] == len(read_header(path).tensors)


# ----------------------------------------------------------------------------- human output, --keys, --help


def test_human_output_lora(lightning_tiny: Path) -> None:
    text = run_inspect(lightning_tiny, "--no-hash")
    lines = text.splitlines()
    assert lines[0] == str(lightning_tiny)
    assert "  kind              LoRA (kohya-diffusers)" in lines
    assert any(line.startswith("  acceleration") and "Lightning 4-step (by file name, keys match)" in line
               for line in lines)
    assert "not computed (pass --hash)" in text
    assert "unet input_blocks.4" in text
    assert "{" not in text  # not JSON


def test_human_output_checkpoint(tiny_ckpt: Path) -> None:
    text = run_inspect(tiny_ckpt)
    assert "sdxl-base (supported)" in text
    assert "checkpoint (single file, SGM layout)" in text
    assert "AutoV2" in text


def test_keys_listing(tiny_ckpt: Path) -> None:
    text = run_inspect(tiny_ckpt, "--keys")
    key = "model.diffusion_model.input_blocks.0.0.weight"
    line = next(ln for ln in text.splitlines() if ln.strip().startswith(key + " "))
    assert line.split()[1:] == ["F16", "[32,", "4,", "3,", "3]"]
    d = inspect_json(tiny_ckpt, "--keys")
    assert len(d["keys"]) == d["tensors"]
    assert {"key": key, "dtype": "F16", "shape": [32, 4, 3, 3]} in d["keys"]
    assert "keys" not in inspect_json(tiny_ckpt)


def test_help_shows_example() -> None:
    result = CliRunner().invoke(cli, ["inspect", "--help"])
    assert result.exit_code == 0
    assert "Example:" in result.stdout
    lines = [line.strip() for line in result.stdout.splitlines()]
    assert "loratool inspect sdxl_lightning_4step_lora.safetensors" in lines  # \b kept the line breaks
    assert "--json" in result.stdout and "--keys" in result.stdout and "--no-hash" in result.stdout


@pytest.mark.subprocess
def test_inspect_never_imports_torch(lightning_tiny: Path, tiny_ckpt: Path, pipeline_folder: Path) -> None:
    root = pipeline_folder
    code = (
        "import sys\n"
        "from lora_tools.ops.inspect import inspect_path\n"
        "for p in sys.argv[1:]:\n"
        "    r = inspect_path(p)\n"
        "    print(r.kind)\n"
        "bad = [m for m in ('torch', 'numpy', 'diffusers', 'transformers') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(lightning_tiny), str(tiny_ckpt), str(root)],
                         cwd=Path(lora_tools.__file__).parents[1], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["lora", "checkpoint", "checkpoint"]


def test_inspect_reports_naming_and_spelling_apart_and_every_target(tmp_path: Path) -> None:
    """issue 10: a kohya-named file spelled with PEFT's lora_A/lora_B: inspect says naming ``kohya``,
    spelling ``peft``, and where every module lands (bigG's q/k/v row block, its transposed
    text_projection, a bias diff's bias, a module SDXL lacks with the reason)."""
    t = {
        "lora_unet_input_blocks_4_1_proj_in.lora_A.weight": torch.randn(2, 64),
        "lora_unet_input_blocks_4_1_proj_in.lora_B.weight": torch.randn(64, 2),
        "lora_unet_input_blocks_4_1_proj_in.diff_b": torch.randn(64),
        "lora_te2_text_model_encoder_layers_0_self_attn_v_proj.lora_A.weight": torch.randn(2, 32),
        "lora_te2_text_model_encoder_layers_0_self_attn_v_proj.lora_B.weight": torch.randn(32, 2),
        "lora_te2_text_projection.lora_down.weight": torch.randn(2, 32),
        "lora_te2_text_projection.lora_up.weight": torch.randn(32, 2),
        "lora_te1_text_projection.lora_down.weight": torch.randn(2, 32),
        "lora_te1_text_projection.lora_up.weight": torch.randn(32, 2),
    }
    path = save_tensors(tmp_path / "mixed.safetensors", t)
    r = CliRunner().invoke(cli, ["inspect", str(path), "--json", "--no-hash"])
    assert r.exit_code == 0, r.stderr
    lora = json.loads(r.stdout)["lora"]
    assert lora["format"] == "kohya" and lora["naming"] == "kohya"
    assert lora["spellings"] == {"peft": 2, "kohya": 2}
    by = {x["module"]: x for x in lora["targets"]}
    assert list(by) == ["unet:input_blocks_4_1_proj_in", "te2:text_model_encoder_layers_0_self_attn_v_proj",
                        "te2:text_projection", "te1:text_projection"]
    te2, unet = "conditioner.embedders.1.model.", "model.diffusion_model."
    assert by["unet:input_blocks_4_1_proj_in"] | {} == {
        "module": "unet:input_blocks_4_1_proj_in", "naming": "kohya", "spelling": "peft", "algorithm": "lora",
        "target": unet + "input_blocks.4.1.proj_in.weight", "bias": unet + "input_blocks.4.1.proj_in.bias",
        "rows": None, "transposed": False, "reason": None}
    v = by["te2:text_model_encoder_layers_0_self_attn_v_proj"]
    assert (v["target"], v["bias"], v["rows"]) == (te2 + "transformer.resblocks.0.attn.in_proj_weight", None, "3/3")
    p = by["te2:text_projection"]
    assert (p["target"], p["transposed"], p["spelling"]) == (te2 + "text_projection", True, "kohya")
    lacking = by["te1:text_projection"]
    assert lacking["target"] is None and "CLIP-L (te1) has no text_projection" in lacking["reason"]
    r = CliRunner().invoke(cli, ["inspect", str(path), "--targets", "--no-hash"])
    assert r.exit_code == 0, r.stderr
    lines = r.stdout.splitlines()
    assert any(line.split() == ["naming", "kohya"] for line in lines)
    (spelled,) = [line for line in lines if line.split()[:2] == ["factor", "spelling"]]
    assert "peft x2" in spelled and "kohya x2" in spelled
    (row,) = [line for line in lines if line.strip().startswith("te2:text_projection")]
    assert "kohya/kohya lora -> " + te2 + "text_projection (stored transposed)" in row
    (row,) = [line for line in lines if line.strip().startswith("te1:text_projection")]
    assert "no target: CLIP-L (te1) has no text_projection" in row
    assert "module targets" not in run_inspect(path, "--no-hash")  # the list is opt-in in the human form
