"""Recipe job kinds other than fuse, on tiny synthetic models: each job's output against the same
operation run through its command (tensor by tensor), skip-if-recorded on re-runs, verify and
publish jobs (a failed verdict is a failed job; publish never touches the network: a fake HfApi)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from lora_tools.cli import cli
from lora_tools.io.safetensors import TensorFile, read_header
from tests.recipe_helpers import REPO_RECIPES, Assets, tokenizer_config

pytestmark = pytest.mark.slow


def invoke(*args: object) -> Result:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, f"exit {result.exit_code}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result


def tensor_bytes(path: Path) -> dict[str, bytes]:
    with TensorFile(path) as f:
        return {k: bytes(f.read_bytes(k)) for k in f.keys()}


def recipe_entry(path: Path) -> dict:
    return json.loads(read_header(path).metadata["loratool"])["recipe"]


def mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


def test_distribution_resize_and_convert_match_the_commands(recipe_assets: Assets, tmp_path: Path) -> None:
    out = tmp_path / "dist"
    args = ["run", REPO_RECIPES / "distribution.yaml", "--set", f"base={recipe_assets.base_b}",
            "--set", f"lightning={recipe_assets.lightning}", "--set", f"style={recipe_assets.style}", "--set", f"output_dir={out}",
            "--only", "small-style*", "--only", "lightning-diffusers"]
    dry = json.loads(invoke(*args, "--dry-run", "--json").stdout)
    assert [(j["name"], j["kind"], j["state"], j["depends_on"]) for j in dry["jobs"]] == [
        ("small-style", "resize", "run", []), ("small-style-comfy", "convert", "pending", ["small-style"]),
        ("lightning-diffusers", "convert", "run", [])]
    first = invoke(*args)
    assert "3 done." in first.stdout
    oracle = tmp_path / "oracle"
    oracle.mkdir()
    invoke("resize", recipe_assets.style, "--rank", "2", "--dtype", "fp16", "-o", oracle / "r2.safetensors")
    invoke("convert", oracle / "r2.safetensors", "--to", "comfy", "-o", oracle / "r2-comfy.safetensors")
    invoke("convert", recipe_assets.lightning / "sdxl_lightning_4step_lora.safetensors", "--to", "peft", "--dtype", "fp16",
           "-o", oracle / "l-peft.safetensors")
    assert tensor_bytes(out / "style-r2.safetensors") == tensor_bytes(oracle / "r2.safetensors")
    assert tensor_bytes(out / "style-r2-comfy.safetensors") == tensor_bytes(oracle / "r2-comfy.safetensors")
    assert tensor_bytes(out / "lightning-4step-peft.safetensors") == tensor_bytes(oracle / "l-peft.safetensors")
    entry = recipe_entry(out / "style-r2.safetensors")
    assert entry["kind"] == "resize" and entry["options"]["rank"] == 2
    assert entry["inputs"] == [{"option": "lora", "name": "style.safetensors",
                                "sha256": __import__("hashlib").sha256(recipe_assets.style.read_bytes()).hexdigest()}]
    before = mtimes(out)
    again = invoke(*args)
    assert "3 skipped." in again.stdout and mtimes(out) == before
    # a changed option redoes that job and the one reading its output
    dry = json.loads(invoke(*args, "--set", "jobs.2.resize.rank=3", "--dry-run", "--json").stdout)
    assert {j["name"]: j["state"] for j in dry["jobs"]} == {"small-style": "redo", "small-style-comfy": "pending",
                                                          "lightning-diffusers": "skip"}
    assert dry["jobs"][0]["reason"] == "style-r2.safetensors: options.rank: 2 -> 3"


def test_style_merge_example_both_ways_match_the_commands(recipe_assets: Assets, tmp_path: Path) -> None:
    out = tmp_path / "out"
    invoke("run", REPO_RECIPES / "lightning-style-merge.yaml", "-q", "--set", f"base={recipe_assets.base_a}",
           "--set", f"lightning={recipe_assets.lightning}", "--set", f"style={recipe_assets.style}", "--set", f"output_dir={out}")
    lightning = recipe_assets.lightning / "sdxl_lightning_4step_lora.safetensors"
    oracle = tmp_path / "oracle"
    oracle.mkdir()
    invoke("merge", lightning, f"{recipe_assets.style}:0.6", "-o", oracle / "merged.safetensors")
    assert tensor_bytes(out / "lightning-4step-style-lora.safetensors") == tensor_bytes(oracle / "merged.safetensors")
    invoke("fuse", recipe_assets.base_a, "--lora", oracle / "merged.safetensors", "-o", oracle / "fused-merged.safetensors", "-q")
    assert tensor_bytes(out / "base-merged-lora.safetensors") == tensor_bytes(oracle / "fused-merged.safetensors")
    invoke("fuse", recipe_assets.base_a, "--lightning", "4", "--lightning-dir", recipe_assets.lightning,
           "--lora", f"{recipe_assets.style}:0.6", "-o", oracle / "fused-two.safetensors", "-q")
    assert tensor_bytes(out / "base-lightning-4step-style.safetensors") == tensor_bytes(oracle / "fused-two.safetensors")


def test_rescale_extract_analyze_jobs(recipe_assets: Assets, tmp_path: Path) -> None:
    recipe = tmp_path / "ops.yaml"
    recipe.write_text(textwrap.dedent(f"""
        version: 1
        inputs: {{base: {recipe_assets.base_a}, style: {recipe_assets.style}}}
        jobs:
          - {{name: half, rescale: {{lora: style, strength: 0.5, output: style-0.5.safetensors}}}}
          - {{name: fused, fuse: {{base: base, loras: [style], output: fused.safetensors}}}}
          - {{name: back, extract: {{tuned: fused, original: base, rank: 4, output: extracted.safetensors}}}}
          - {{name: found, analyze: {{model: fused, base: base, loras: [style], output: analyze.json}}}}
        """))
    invoke("run", recipe, "-q")
    oracle = tmp_path / "oracle"
    oracle.mkdir()
    invoke("rescale", recipe_assets.style, "--strength", "0.5", "-o", oracle / "half.safetensors")
    assert tensor_bytes(tmp_path / "style-0.5.safetensors") == tensor_bytes(oracle / "half.safetensors")
    invoke("extract", tmp_path / "fused.safetensors", recipe_assets.base_a, "--rank", "4", "-o", oracle / "x.safetensors")
    assert tensor_bytes(tmp_path / "extracted.safetensors") == tensor_bytes(oracle / "x.safetensors")
    cli_report = json.loads(invoke("analyze", tmp_path / "fused.safetensors", "--base", recipe_assets.base_a,
                                   "--lora", recipe_assets.style, "--json").stdout)
    job_report = json.loads((tmp_path / "analyze.json").read_text())
    assert {k: v for k, v in job_report.items() if k != "loratool"} == cli_report
    assert job_report["loras"][0]["strength"] == pytest.approx(1.0, abs=1e-3)
    again = invoke("run", recipe)
    assert "4 skipped." in again.stdout


def _verify_sets(a: Assets, config: Path, out: Path, *only: str) -> list[str]:
    args = ["--set", f"base_a={a.base_a}", "--set", f"base_b={a.base_b}", "--set", f"lightning={a.lightning}",
            "--set", f"output_dir={out}", "--set", "verify_size=32x32", "--set", "verify_device=cpu",
            "--set", f"jobs.1.verify.config={config}", "--set", "jobs.1.verify.prompts=[a cat]",
            "--set", "jobs.1.verify.seeds=[0]", "--set", "jobs.1.verify.dtype=fp32"]
    for pattern in only:
        args += ["--only", pattern]
    return args


@pytest.mark.diffusers  # a verify job
def test_publisher_batch_verify_and_publish(recipe_assets: Assets, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tokenizer_config(tmp_path)
    out = tmp_path / "out"
    chain = ("base_a-4step", "verify-base_a-4step", "publish-base_a-4step")
    args = ["run", REPO_RECIPES / "publisher-batch.yaml", *_verify_sets(recipe_assets, config, out, *chain)]
    dry = json.loads(invoke(*args, "--dry-run", "--json").stdout)
    assert [(j["name"], j["kind"], j["depends_on"]) for j in dry["jobs"]] == [
        ("base_a-4step", "fuse", []), ("verify-base_a-4step", "verify", ["base_a-4step"]),
        ("publish-base_a-4step", "publish", ["base_a-4step", "verify-base_a-4step"])]
    full = json.loads(invoke("run", REPO_RECIPES / "publisher-batch.yaml", "--dry-run", "--json",
                             *_verify_sets(recipe_assets, config, out)).stdout)
    assert len(full["jobs"]) == 18
    first = invoke(*args)
    assert "3 done." in first.stdout
    report = json.loads((out / "verify" / "base_a-4step" / "report.json").read_text())
    assert report["verdict"] == "pass" and report["loratool"]["passed"] is True
    assert report["files"][-1] == str(out / "verify" / "base_a-4step" / "report.md")
    assert report["settings"]["timesteps"] == [999, 749, 499, 249]
    assert not (out / "release").exists(), "a dry-run publish wrote something"
    # the verify job is `loratool verify` with the same options: same settings, same images, same PSNR
    fused, lightning = out / "base_a-lightning-4step.safetensors", recipe_assets.lightning / "sdxl_lightning_4step_lora.safetensors"
    oracle = tmp_path / "oracle-verify"
    invoke("verify", fused, "--against", recipe_assets.base_a, "--lora", lightning, "--config", config, "--prompt", "a cat",
           "--seeds", "0", "--size", "32x32", "--device", "cpu", "--dtype", "fp32", "--out", oracle)
    cli_report = json.loads((oracle / "report.json").read_text())
    assert report["settings"] == cli_report["settings"] and report["verdict"] == cli_report["verdict"]
    assert [i["psnr_db"] for i in report["images"]] == [i["psnr_db"] for i in cli_report["images"]]
    assert (out / "verify" / "base_a-4step" / "grid.png").read_bytes() == (oracle / "grid.png").read_bytes()
    before = mtimes(out)
    again = invoke(*args)
    assert "1 done, 2 skipped." in again.stdout and mtimes(out) == before  # the dry-run publish runs again

    # publish for real, up to huggingface_hub (a fake HfApi)
    calls: list[tuple[str, dict]] = []

    class FakeApi:
        def create_repo(self, repo_id: str, **kw: object) -> None:
            calls.append(("create_repo", {"repo_id": repo_id, **kw}))

        def upload_folder(self, **kw: object) -> None:
            calls.append(("upload_folder", {**kw, "files": sorted(p.name for p in Path(str(kw["folder_path"])).iterdir())}))

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", lambda: FakeApi())
    invoke(*args, "--set", "dry_run=false", "--set", "owner=me")
    release = out / "release" / "base_a-4step"
    assert sorted(p.name for p in release.iterdir()) == sorted(
        ["base_a-lightning-4step.safetensors", "base_a-4step-grid.png", "README.md", "scheduler_config.json"])
    assert (release / "base_a-4step-grid.png").read_bytes() == (out / "verify" / "base_a-4step" / "grid.png").read_bytes()
    assert "![base_a-4step-grid.png](base_a-4step-grid.png)" in (release / "README.md").read_text()
    # and the release is `loratool publish`'s (which has no grid option: its card is the job's without the grid)
    cli_release = tmp_path / "oracle-release"
    invoke("publish", out / "base_a-lightning-4step.safetensors", "--license", "openrail++", "--release-dir", cli_release)
    for name in ("base_a-lightning-4step.safetensors", "scheduler_config.json"):
        assert (release / name).read_bytes() == (cli_release / name).read_bytes()
    job_card = (release / "README.md").read_text().splitlines()
    assert [line for line in (cli_release / "README.md").read_text().splitlines() if line not in job_card] == []
    assert [c[0] for c in calls] == ["create_repo", "upload_folder"]
    assert calls[0][1]["repo_id"] == "me/base_a-lightning-4step" and calls[1][1]["files"] == sorted(
        p.name for p in release.iterdir())
    third = invoke(*args, "--set", "dry_run=false", "--set", "owner=me")
    assert "3 skipped." in third.stdout and len(calls) == 2, "an unchanged release was uploaded again"


@pytest.mark.diffusers  # a verify job
def test_a_failed_verdict_is_a_failed_job(recipe_assets: Assets, tmp_path: Path) -> None:
    """A model fused at strength 0.5, verified against base + the LoRA at 1.0: the verdict fails."""
    config = tokenizer_config(tmp_path)
    recipe = tmp_path / "r.yaml"
    lora = recipe_assets.lightning / "sdxl_lightning_4step_lora.safetensors"
    recipe.write_text(textwrap.dedent(f"""
        version: 1
        inputs: {{base: {recipe_assets.base_a}, lightning: {recipe_assets.lightning}, config: {config}}}
        jobs:
          - {{name: half, fuse: {{base: base, lightning: 4, strength: 0.5, lightning_dir: lightning,
                                  output: half.safetensors}}}}
          - name: check
            verify: {{model: half, against: base, loras: [{{lora: {lora}, strength: 1.0}}], config: config,
                      prompts: [a cat], seeds: [0], size: 32x32, device: cpu, dtype: fp32, out: check}}
        """))
    result = CliRunner().invoke(cli, ["run", str(recipe), "-q", "--json"])
    assert result.exit_code == 1, result.output
    outcomes = {r["name"]: (r["outcome"], r["message"]) for r in json.loads(result.stdout)["results"]}
    assert outcomes["half"][0] == "done" and outcomes["check"][0] == "failed"
    assert "verify failed (verdict fail: worst PSNR" in outcomes["check"][1]
    assert json.loads((tmp_path / "check" / "report.json").read_text())["verdict"] == "fail"
    dry = json.loads(invoke("run", recipe, "--dry-run", "--json").stdout)
    assert {j["name"]: j["state"] for j in dry["jobs"]} == {"half": "skip", "check": "redo"}
