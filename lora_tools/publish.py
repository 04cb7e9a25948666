"""Publish fused models: a release folder (model files, model card, scheduler config), then upload.

:func:`plan_release` reads the files' ``loratool`` records and hashes them, and writes nothing;
:func:`write_release` writes the folder; :func:`upload_release` sends it through
huggingface_hub (``create_repo`` + ``upload_folder``; the token comes from the usual places).

The card never invents a license: ``license`` given, else the base's own ``modelspec.license``,
else ``unknown`` (and :func:`upload_release` refuses until one is given).

Example:
    >>> plan = plan_release("out/juggernaut-lightning-4step.safetensors", repo="me/juggernaut-lightning",
    ...                     license="openrail++")
    >>> upload_release(plan, write_release(plan))
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from lora_tools.errors import Hint, InvalidFileError, OutputExistsError, UsageError
from lora_tools.io.hashing import sha256_file_and_tensors
from lora_tools.io.safetensors import read_header
from lora_tools.provenance import LORATOOL_METADATA_KEY, read_record

UNKNOWN = "unknown"


@dataclass(frozen=True)
class ReleaseFile:
    """One model file of a release, with its hashes and record."""

    path: Path
    nbytes: int
    sha256: str
    tensor_sha256: str  # sha256 of the bytes after the header (metadata edits do not change it)
    record: dict[str, Any]
    license: str | None  # the file's ``modelspec.license``, if any

    @property
    def autov2(self) -> str:
        return self.sha256[:10]


@dataclass
class ReleasePlan:
    """What a release holds, decided before anything is written."""

    files: list[ReleaseFile]
    folder: Path
    card: str
    scheduler_config: dict[str, Any] | None
    repo: str | None
    private: bool
    license: str
    warnings: list[str] = field(default_factory=list)
    #: Further files copied into the release: ``(source, name in the release)`` (verification grids).
    extras: list[tuple[Path, str]] = field(default_factory=list)

    def listing(self) -> list[tuple[str, int]]:
        """``(name, bytes)`` of every file the release folder will hold."""
        out = [(f.path.name, f.nbytes) for f in self.files]
        out += [(name, src.stat().st_size) for src, name in self.extras]
        out.append(("README.md", len(self.card.encode())))
        if self.scheduler_config is not None:
            out.append(("scheduler_config.json", len(_scheduler_json(self.scheduler_config).encode())))
        return out


class HubApi(Protocol):
    """The part of ``huggingface_hub.HfApi`` publishing uses (tests pass a fake)."""

    def create_repo(self, repo_id: str, *, private: bool = ..., repo_type: str | None = ..., exist_ok: bool = ...) -> Any: ...

    def upload_folder(self, *, repo_id: str, folder_path: str, repo_type: str | None = ...,
                      commit_message: str | None = ...) -> Any: ...


def _model_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.glob("*.safetensors") if p.is_file())
        if not files:
            raise UsageError(f"'{path}' holds no .safetensors files to publish.")
        return files
    from lora_tools.special_files import refuse_special

    refuse_special(path)
    raise UsageError(f"'{path}' does not exist.")


def _scheduler_json(cfg: dict[str, Any]) -> str:
    return json.dumps(cfg, indent=2, sort_keys=True) + "\n"


def plan_release(path: str | Path, *, repo: str | None = None, license: str | None = None, private: bool = False,
                 folder: str | Path | None = None, overwrite: bool = False, base_model: list[str] | None = None,
                 grids: list[tuple[str | Path, str]] | None = None) -> ReleasePlan:
    """Read and hash the model file(s) and build the card; writes nothing.

    Args:
        path: one model file, or a folder whose ``*.safetensors`` files are released together.
        repo: the hub repository id (``owner/name``) to upload to.
        license: the license id for the card; default: the base's recorded ``modelspec.license``.
        private: create the repository private.
        folder: the release folder (default ``<file stem>-release`` or ``<folder>/release``).
        overwrite: replace an existing release folder.
        base_model: hub ids of the parent models for the card (presets' repos are added).
        grids: verification grids to copy into the release, as ``(image path, name in the release)``;
            default: the ``*grid*.png`` files next to the model file(s), shown but not copied.

    Raises:
        [`UsageError`]: nothing to publish, a file without a ``loratool`` record, a malformed repo id.
        [`OutputExistsError`]: the release folder exists and ``overwrite`` was not given.
    """
    from lora_tools.hub import REPO_ID_RE
    from lora_tools.io.hashing import autov2_hash  # noqa: F401  (validates the format of the hashes we print)

    src = Path(path)
    if repo is not None and not REPO_ID_RE.fullmatch(repo):
        raise UsageError(f"'{repo}' is not a hub repository id (owner/name).")
    files: list[ReleaseFile] = []
    for p in _model_files(src):
        header = read_header(p)
        record = read_record(header.metadata)
        if record is None:
            raise InvalidFileError(f"'{p}' has no loratool record: publish releases files made by loratool.")
        sha, tensor_sha = sha256_file_and_tensors(p)
        files.append(ReleaseFile(p, p.stat().st_size, sha, tensor_sha, record, header.metadata.get("modelspec.license")))
    out = Path(folder) if folder is not None else (src.parent / f"{src.stem}-release" if src.is_file() else src / "release")
    check_release_folder(out, [f.path for f in files] + [Path(g) for g, _ in grids or []], overwrite=overwrite)
    warnings: list[str] = []
    chosen = license or next((f.license for f in files if f.license), None) or UNKNOWN
    if chosen == UNKNOWN:
        warnings.append("the license of the base model is unknown: the card says 'unknown'; "
                        "name it before uploading")
    sampler = files[0].record.get("sampler")
    sched = None
    if isinstance(sampler, dict):
        from lora_tools.io.diffusers_folder import SCHEDULER_CONFIG

        sched = dict(SCHEDULER_CONFIG)
        sched.update({"_class_name": sampler.get("scheduler", "EulerDiscreteScheduler"),
                      "timestep_spacing": sampler.get("timestep_spacing", "trailing"),
                      "prediction_type": sampler.get("prediction_type", "epsilon")})
    extras: list[tuple[Path, str]] = []
    if grids is None:
        names = sorted(p.name for p in (src if src.is_dir() else src.parent).glob("*grid*.png"))
    else:
        for image, name in grids:
            if not Path(image).is_file():
                raise UsageError(f"'{image}': no such verification grid.")
            extras.append((Path(image), name))
        names = [name for _, name in extras]
    card = model_card(files, license=chosen, repo=repo, base_model=base_model or [], grids=names)
    return ReleasePlan(files, out, card, sched, repo, private, chosen, warnings, extras)


def release_folder_of_ours(folder: Path) -> str | None:
    """Why ``folder`` may not be replaced as an earlier release: ``None`` when every file in it
    is one a release of ours holds (model files carrying our record, the card, the scheduler
    config, verification grids) and at least one model file carries our record."""
    if folder.is_symlink():
        return "it is a symbolic link"
    if not folder.is_dir():
        return "it is not a folder"
    ours = False
    for entry in folder.iterdir():
        if entry.is_symlink() or not entry.is_file():
            return f"it holds '{entry.name}', which is not a plain file"
        if entry.suffix == ".safetensors":
            try:
                recorded = LORATOOL_METADATA_KEY in read_header(entry).metadata
            except Exception:  # noqa: BLE001 - an unreadable header is simply not ours
                recorded = False
            if not recorded:
                return f"it holds '{entry.name}', which loratool did not write"
            ours = True
            continue
        if entry.name not in ("README.md", "scheduler_config.json") and entry.suffix != ".png":
            return f"it holds '{entry.name}', which a release does not hold"
    return None if ours else "it holds no model file written by loratool"


def check_release_folder(folder: Path, inputs: list[Path], *, overwrite: bool) -> None:
    """Refuse a release folder that is, holds or lies beside-as-parent of an input, or that
    exists and is not an earlier release of ours (``overwrite`` replaces only those).

    Raises:
        [`UsageError`]: the folder is an input or holds one.
        [`OutputExistsError`]: it exists and ``overwrite`` was not given, or it is not ours.
    """
    from lora_tools.output.plan import check_place, refuse_input_as_output

    refuse_input_as_output(folder, inputs)
    check_place(folder)
    if not folder.exists() and not folder.is_symlink():
        return
    if not overwrite:
        raise OutputExistsError(f"'{folder}' already exists", hint=Hint("overwrite", "to replace it"))
    why = release_folder_of_ours(folder)
    if why is not None:
        raise OutputExistsError(f"'{folder}' already exists and is not an earlier release of loratool's ({why}): "
                                "nothing was removed; choose another release folder.")


def _licensed_row(name: str) -> Any:
    """The preset row called ``name`` when it records the license of its weights (else ``None``)."""
    from lora_tools.errors import LoraToolsError
    from lora_tools.presets import get_preset

    try:
        row = get_preset(name)
    except LoraToolsError:
        return None
    return row if row.license else None


def _presets(record: dict[str, Any]) -> list[str]:
    names = [s.get("preset") for s in record.get("sources", []) if isinstance(s, dict) and s.get("preset")]
    return list(dict.fromkeys(str(n) for n in names))


def model_card(files: list[ReleaseFile], *, license: str, repo: str | None = None, base_model: list[str] = (),  # type: ignore[assignment]
               grids: list[str] = ()) -> str:  # type: ignore[assignment]
    """The ``README.md`` of a release: YAML front matter, then what was fused, how to use it,
    the licenses, hashes and the recipe of each file."""
    import yaml

    from lora_tools.provenance import dump_recipe, recipe_from_record

    first = files[0].record
    presets = list(dict.fromkeys(p for f in files for p in _presets(f.record)))
    parents = list(base_model)
    for row in filter(None, map(_licensed_row, presets)):
        if row.repo_id not in parents:
            parents.append(row.repo_id)
    tags = ["text-to-image", "stable-diffusion-xl", "diffusers", "loratool", "merge"]
    tags += [t for p in presets for t in (p.split("-")[0], p)]
    front: dict[str, Any] = {}
    if parents:
        front["base_model"] = parents
        front["base_model_relation"] = "merge"
    front.update({"library_name": "diffusers", "pipeline_tag": "text-to-image",
                  "tags": list(dict.fromkeys(tags)), "license": license})
    title = repo.split("/")[-1] if repo else files[0].path.stem
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "", f"# {title}", ""]
    lines += ["Made with loratool (the `lora-tools` Python package) from the records in the files' metadata.", ""]
    lines += ["## What was fused", ""]
    for f in files:
        lines.append(f"**{f.path.name}**" + (f" ({f.record.get('method')} method)" if f.record.get("method") else "") + ":")
        for s in f.record.get("sources", []):
            role = s.get("role")
            if role == "base":
                lines.append(f"- base: `{s.get('name')}`")
            elif role == "lora":
                lines.append(f"- LoRA `{s.get('name')}` at strength {s.get('strength')}"
                             + (f" (preset {s.get('preset')})" if s.get("preset") else ""))
            elif role == "unet-difference":
                lines.append(f"- UNet difference `{s.get('tuned')}` - `{s.get('original')}` at strength {s.get('strength')}")
        lines.append("")
    sampler = first.get("sampler")
    if isinstance(sampler, dict):
        steps, cfg = sampler.get("steps"), sampler.get("guidance_scale", 0)
        pred = sampler.get("prediction_type", "epsilon")
        extra = f', prediction_type="{pred}"' if pred != "epsilon" else ""
        lines += ["## How to use it", "", "diffusers:", "", "```py",
                  "import torch",
                  f"from diffusers import StableDiffusionXLPipeline, {sampler.get('scheduler', 'EulerDiscreteScheduler')}",
                  "",
                  f'pipe = StableDiffusionXLPipeline.from_single_file("{files[0].path.name}", torch_dtype=torch.float16).to("cuda")',
                  f"pipe.scheduler = {sampler.get('scheduler')}.from_config(pipe.scheduler.config, "
                  f'timestep_spacing="{sampler.get("timestep_spacing")}"{extra})',
                  f'image = pipe("a photo of a cat", num_inference_steps={steps}, guidance_scale={cfg}).images[0]',
                  "```", "",
                  f"ComfyUI: KSampler sampler `{sampler.get('comfy_sampler')}`, scheduler `{sampler.get('comfy_scheduler')}`, "
                  f"steps {steps}, CFG {sampler.get('comfy_cfg')}."
                  + (" Add ModelSamplingDiscrete (x0)." if pred == "sample" else ""), "",
                  f"A1111 / Forge: sampler Euler, schedule type SGM Uniform, steps {steps}, CFG {sampler.get('comfy_cfg')}.", ""]
        if len({json.dumps(f.record.get('sampler'), sort_keys=True) for f in files}) > 1:
            lines += ["The files differ in steps: each file's own settings are in its metadata "
                      "(`modelspec.usage_hint`).", ""]
    if grids:
        lines += ["## Verification", ""] + [f"![{g}]({g})" for g in grids] + [""]
    lines += ["## License", ""]
    lines.append(f"This release: `{license}`" + (" (not known: ask the base model's author)." if license == UNKNOWN else "."))
    for row in filter(None, map(_licensed_row, presets)):  # the preset rows record their weights' license
        lines.append(f"It contains weights of [{row.repo_id}](https://huggingface.co/{row.repo_id}), "
                     f"licensed `{row.license}`.")
    lines.append("The base model's own license applies to its weights.")
    lines += ["", "## Files and hashes", "", "| file | size | sha256 | AutoV2 | tensor-only sha256 |", "|---|---|---|---|---|"]
    for f in files:
        lines.append(f"| {f.path.name} | {f.nbytes} | `{f.sha256}` | `{f.autov2}` | `{f.tensor_sha256}` |")
    lines += ["", "## Recipe", "", "Rebuild a file bit for bit with `loratool run` (inputs next to the recipe, "
              "or `--set NAME=PATH`):", ""]
    for f in files:
        kind = "checkpoint"
        try:
            recipe = dump_recipe(recipe_from_record(f.record, f.path, kind))
        except Exception:  # a record of an operation recipes do not run: the record itself
            recipe = json.dumps(f.record, indent=2, sort_keys=True)
        lines += [f"`{f.path.name}`:", "", "```yaml", recipe.rstrip(), "```", ""]
    return "\n".join(lines)


def write_release(plan: ReleasePlan) -> Path:
    """Write the release folder (model files hard-linked where possible, else copied), all at once:
    into a recognisable temporary folder beside it, then moved into place. An existing folder is
    replaced only if it is an earlier release of ours (checked again here, just before)."""
    from lora_tools.errors import LoraToolsError
    from lora_tools.io.atomic import claim, create_temp_dir, output_error, remove, remove_stale_temps, replace

    final = plan.folder
    check_release_folder(final, [f.path for f in plan.files] + [src for src, _ in plan.extras], overwrite=True)
    remove_stale_temps(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = create_temp_dir(final)
    except OSError as e:  # a name too long for its temp, a read-only disk...: named by the release folder
        raise output_error(final, e) from None
    old: Path | None = None
    try:
        for f in plan.files:
            try:
                os.link(f.path, tmp / f.path.name)
            except OSError:
                shutil.copy2(f.path, tmp / f.path.name)
        for image, name in plan.extras:
            shutil.copy2(image, tmp / name)
        (tmp / "README.md").write_text(plan.card, encoding="utf-8")
        if plan.scheduler_config is not None:
            (tmp / "scheduler_config.json").write_text(_scheduler_json(plan.scheduler_config))
        if final.exists():
            old = replace(tmp, final)
        else:
            claim(tmp, final)
    except OSError as e:
        remove(tmp)
        if isinstance(e, LoraToolsError):
            raise
        raise output_error(final, e) from None
    except BaseException:
        remove(tmp)
        raise
    if old is not None:
        remove(old)
    return final


def check_upload(plan: ReleasePlan) -> str:
    """Refuse an upload that lacks a repository or a known license (before anything is written);
    returns the repository id.

    Raises:
        [`UsageError`]: no ``repo``, or the license is unknown.
    """
    if plan.repo is None:
        raise UsageError("No repository to upload to", hint=Hint("repo", "to upload", "ID"))
    if plan.license == UNKNOWN:
        raise UsageError("The license of the base model is unknown, and a release needs one",
                         hint=Hint("license", "to name it (e.g. openrail++)", "ID"))
    return plan.repo


def upload_release(plan: ReleasePlan, folder: Path, *, api: HubApi | None = None) -> str:
    """Create the repository (if needed) and upload the release folder; returns the repo's URL.

    Raises:
        [`UsageError`]: see :func:`check_upload`.
    """
    repo = check_upload(plan)
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    api.create_repo(repo, private=plan.private, repo_type="model", exist_ok=True)
    api.upload_folder(repo_id=repo, folder_path=str(folder), repo_type="model",
                      commit_message=f"Release {', '.join(f.path.name for f in plan.files)} (loratool)")
    return f"https://huggingface.co/{plan.repo}"


__all__ = ["plan_release", "check_upload", "write_release", "upload_release", "model_card", "ReleasePlan", "ReleaseFile", "HubApi"]
