"""``loratool publish``: the release folder, the model card (parsed by huggingface_hub's ModelCard),
hashes checked independently, and the upload path up to huggingface_hub with a fake HfApi."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from huggingface_hub import ModelCard

from lora_tools.cli import cli
from lora_tools.errors import UsageError
from lora_tools.publish import plan_release, upload_release, write_release
from tests.fuse_helpers import listing
from tests.recipe_helpers import Assets


@pytest.fixture(scope="module")
def fused(recipe_assets: Assets, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("publish") / "model-lightning-4step.safetensors"
    result = CliRunner().invoke(cli, ["fuse", str(recipe_assets.base_a), "--lightning", "4", "--lightning-dir",
                                      str(recipe_assets.lightning), "--lora", f"{recipe_assets.style}:0.6", "-o", str(out), "-q"])
    assert result.exit_code == 0, result.output
    return out


def hashes(path: Path) -> tuple[str, str]:
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return hashlib.sha256(data).hexdigest(), hashlib.sha256(data[8 + n:]).hexdigest()


def test_dry_run_lists_the_release_and_writes_nothing(fused: Path) -> None:
    before = listing(fused.parent)
    result = CliRunner().invoke(cli, ["publish", str(fused), "--repo", "me/model", "--license", "openrail++", "--dry-run"])
    assert result.exit_code == 0, result.output
    names = re.findall(r"^  (\S+) \(", result.stdout, flags=re.M)
    assert names == [fused.name, "README.md", "scheduler_config.json"]
    assert "-> https://huggingface.co/me/model" in result.stdout
    assert listing(fused.parent) == before


def test_release_folder_and_card(fused: Path, tmp_path: Path) -> None:
    folder = tmp_path / "release"
    result = CliRunner().invoke(cli, ["publish", str(fused), "--release-dir", str(folder), "--license", "openrail++"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in folder.iterdir()) == sorted([fused.name, "README.md", "scheduler_config.json"])
    assert (folder / fused.name).read_bytes() == fused.read_bytes()
    card = ModelCard.load(folder / "README.md")
    data = card.data.to_dict()
    assert data["base_model"] == ["ByteDance/SDXL-Lightning"]
    assert data["base_model_relation"] == "merge"
    assert data["library_name"] == "diffusers" and data["pipeline_tag"] == "text-to-image"
    assert data["license"] == "openrail++" and "lightning-4step" in data["tags"]
    sha, tensor_sha = hashes(fused)
    assert f"| `{sha}` | `{sha[:10]}` | `{tensor_sha}` |" in card.text
    assert "LoRA `style.safetensors` at strength 0.6" in card.text
    assert "num_inference_steps=4, guidance_scale=0.0" in card.text
    assert 'timestep_spacing="trailing"' in card.text and "sgm_uniform" in card.text
    assert "licensed `openrail++`" in card.text
    recipe_text = card.text.split("```yaml\n", 1)[1].split("```", 1)[0]
    shown = CliRunner().invoke(cli, ["recipe", "show", str(fused)]).stdout
    assert yaml.safe_load(recipe_text) == yaml.safe_load(shown)
    sched = json.loads((folder / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "EulerDiscreteScheduler" and sched["timestep_spacing"] == "trailing"


def test_unknown_license_is_never_invented(fused: Path, tmp_path: Path) -> None:
    plan = plan_release(fused, repo="me/model", folder=tmp_path / "r")
    assert plan.license == "unknown"
    assert ModelCard(plan.card).data.to_dict()["license"] == "unknown"
    before = listing(fused.parent)
    result = CliRunner().invoke(cli, ["publish", str(fused), "--repo", "me/model", "--release-dir", str(tmp_path / "r")])
    assert result.exit_code == 1
    assert result.stderr.strip() == ("Error: The license of the base model is unknown, and a release needs one; "
                                     "pass --license ID to name it (e.g. openrail++).")
    assert listing(fused.parent) == before and not (tmp_path / "r").exists()
    with pytest.raises(UsageError, match=r"pass license=ID"):
        upload_release(plan, tmp_path)


class FakeApi:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []

    def create_repo(self, repo_id: str, **kwargs: object) -> None:
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))

    def upload_folder(self, **kwargs: object) -> None:
        folder = Path(str(kwargs["folder_path"]))
        self.calls.append(("upload_folder", {**kwargs, "files": sorted(p.name for p in folder.iterdir())}))


def test_upload_goes_through_huggingface_hub(fused: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeApi()
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", lambda: fake)
    result = CliRunner().invoke(cli, ["publish", str(fused), "--repo", "me/model", "--private", "--license", "openrail++",
                                      "--release-dir", str(tmp_path / "rel")])
    assert result.exit_code == 0, result.output
    assert [c[0] for c in fake.calls] == ["create_repo", "upload_folder"]
    assert fake.calls[0][1] == {"repo_id": "me/model", "private": True, "repo_type": "model", "exist_ok": True}
    assert fake.calls[1][1]["repo_id"] == "me/model"
    assert fake.calls[1][1]["files"] == sorted([fused.name, "README.md", "scheduler_config.json"])
    assert "Uploaded to https://huggingface.co/me/model" in result.stdout


def test_library_api_with_an_injected_api(fused: Path, tmp_path: Path) -> None:
    plan = plan_release(fused, repo="me/model", license="openrail++", folder=tmp_path / "x")
    folder = write_release(plan)
    fake = FakeApi()
    assert upload_release(plan, folder, api=fake) == "https://huggingface.co/me/model"
    with pytest.raises(Exception, match="already exists"):
        plan_release(fused, folder=tmp_path / "x")


def test_refuses_a_file_not_made_by_loratool(recipe_assets: Assets) -> None:
    result = CliRunner().invoke(cli, ["publish", str(recipe_assets.base_a), "--dry-run"])
    assert result.exit_code == 1
    assert result.stderr.strip() == (f"Error: '{recipe_assets.base_a}' has no loratool record: publish releases files "
                                     "made by loratool.")


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("where", ["documents", "parent", "input-folder", "link-to-input-folder", "dot"])
def test_overwrite_never_removes_a_folder_it_did_not_make(fused: Path, tmp_path: Path, where: str,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Data loss: ``--overwrite`` replaces only an earlier release of ours; never the user's
    files, the input's folder or a folder holding the input."""
    work = tmp_path / "work"
    work.mkdir()
    model = work / fused.name
    model.write_bytes(fused.read_bytes())
    docs = tmp_path / "documents"
    docs.mkdir()
    (docs / "thesis.txt").write_text("years of work")
    (docs / "README.md").write_text("not a release")
    (tmp_path / "link").symlink_to(work)
    monkeypatch.chdir(work)
    target = {"documents": str(docs), "parent": "..", "input-folder": str(work),
              "link-to-input-folder": str(tmp_path / "link"), "dot": "."}[where]
    before = _tree(tmp_path)
    result = CliRunner().invoke(cli, ["publish", str(model), "--release-dir", target, "--overwrite",
                                      "--license", "openrail++"])
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert _tree(tmp_path) == before
    assert not [p for p in tmp_path.rglob("*") if ".loratool.partial" in p.name]


def test_overwrite_replaces_an_earlier_release_of_ours(fused: Path, tmp_path: Path) -> None:
    folder = tmp_path / "release"
    args = ["publish", str(fused), "--release-dir", str(folder), "--license", "openrail++"]
    assert CliRunner().invoke(cli, args).exit_code == 0
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 1 and "already exists" in again.stderr
    (folder / "README.md").write_text("stale card")
    result = CliRunner().invoke(cli, [*args, "--overwrite"])
    assert result.exit_code == 0, result.output
    assert (folder / "README.md").read_text() != "stale card"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["release"]
