"""``publish``: a release folder with a model card, then an upload to the hub (:mod:`lora_tools.publish`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from lora_tools.ops.operation import Operation, OpResult, Options, cli

INPUT_KEYS = ("path",)
OUTPUT_KEYS = ("release_dir",)


class PublishOptions(Options):
    """Options of ``publish``; ``release_dir`` is the folder it writes. ``verify`` (recipes) names verify jobs
    whose ``grid.png`` joins the release."""

    path: str = Field(json_schema_extra=cli(argument=True))
    repo: str | None = Field(None, description="Hub repository (owner/name) to upload to.",
                             json_schema_extra=cli(metavar="ID"))
    private: bool = Field(False, description="Create the repository private.")
    license: str | None = Field(None, description="License id for the card (default: the base's recorded license).",
                                json_schema_extra=cli(metavar="ID"))
    release_dir: str | None = Field(None, description="Release folder (default: next to PATH).")
    verify: list[str] = Field(default_factory=list, description="Verify jobs whose grid.png joins the release.",
                              json_schema_extra=cli(command=False))
    dry_run: bool = Field(False, description="Show what would be written and uploaded; write and upload nothing.")

    @field_validator("verify", mode="before")
    @classmethod
    def _one(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("repo")
    @classmethod
    def _repo(cls, v: str | None) -> str | None:
        from lora_tools.hub import REPO_ID_RE

        if v is not None and not REPO_ID_RE.fullmatch(v):
            raise ValueError(f"expected a hub repository id owner/name, got '{v}'")
        return v


@dataclass
class PublishOpPlan:
    options: PublishOptions
    plan: Any

    @cached_property
    def entry(self) -> dict[str, Any]:
        return OPERATION.entry(self.options)

    def close(self) -> None:
        """Nothing held."""


def plan(o: PublishOptions, *, overwrite: bool = False) -> PublishOpPlan:
    """Read and hash the model file(s) and build the card (:func:`lora_tools.publish.plan_release`)."""
    from lora_tools.publish import check_upload, plan_release

    grids = [(str(Path(folder) / "grid.png"), f"{Path(folder).name}-grid.png") for folder in o.verify]
    rp = plan_release(o.path, repo=o.repo, license=o.license, private=o.private, folder=o.release_dir,
                      overwrite=overwrite, grids=[g for g in grids if Path(g[0]).is_file()] if o.verify else None)
    if o.repo is not None:
        check_upload(rp)
    return PublishOpPlan(o, rp)


def run(planned: PublishOpPlan, *, created: str | None = None,
        progress: Callable[[int], None] | None = None) -> OpResult:
    """Write the release folder and, with ``repo``, upload it (``extra["url"]``); a dry run writes nothing."""
    from lora_tools.publish import upload_release, write_release

    if planned.options.dry_run:
        return OpResult([], planned.plan)
    folder = write_release(planned.plan)
    extra = {"url": upload_release(planned.plan, folder)} if planned.plan.repo else {}
    return OpResult([Path(folder)], planned.plan, None, extra)


def outputs(options: Mapping[str, Any]) -> tuple[str, ...]:
    """The release folder, or nothing for a dry run."""
    return () if options.get("dry_run") else (str(options["release_dir"]),)


OPERATION = Operation("publish", PublishOptions, INPUT_KEYS, OUTPUT_KEYS, "release", plan, run,
                      recipe_required=("release_dir",), outputs=outputs, summary="prepare and upload a release")
