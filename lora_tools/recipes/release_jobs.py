"""Adapters of the ``verify`` and ``publish`` job kinds.

``verify`` runs :func:`lora_tools.verify.plan_verify` / :func:`~lora_tools.verify.run_verify` (what
``loratool verify`` runs) into a temp folder renamed into place, so its output folder (``report.json``,
``report.md``, ``grid.png``, ``images/``) appears whole or not at all. ``report.json`` carries a
``loratool`` entry with the job's ``recipe`` entry and whether the check passed: a re-run skips a
passed verify of the same inputs and options. A failed verdict (or a NaN) is a failed job.

``publish`` runs :func:`lora_tools.publish.plan_release`, :func:`~lora_tools.publish.write_release`
and, with a ``repo``, :func:`~lora_tools.publish.upload_release` (what ``loratool publish`` runs).
``dry_run`` plans the release and writes and uploads nothing. A release folder that already holds
the same card and model files is up to date (and is not uploaded again).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lora_tools.errors import OutputExistsError
from lora_tools.ops.registry import Operation
from lora_tools.provenance import LORATOOL_METADATA_KEY
from lora_tools.recipes.jobs import JobCheck, JobResult, Progress, ResolvedJob
from lora_tools.recipes.lora_jobs import compare_entries


class VerifyJob:
    """``verify`` jobs (see the module docstring)."""

    kind = "verify"

    def __init__(self, op: Operation) -> None:
        self.op = op
        self.kind = op.name

    def plan(self, job: ResolvedJob, out: Path | None):
        options = self.op.options_model.model_validate(job.options)
        update = {"out": str(out)} if out is not None else {"out": None, "workflow": False}  # a check writes nothing
        return self.op.plan(options.model_copy(update=update), overwrite=True)

    @staticmethod
    def stored(folder: Path) -> tuple[dict[str, Any] | None | bool, bool]:
        """``(recipe entry, passed)`` of an earlier run's ``report.json`` (entry ``False``: no folder)."""
        if not folder.exists():
            return False, False
        try:
            record = json.loads((folder / "report.json").read_text(encoding="utf-8")).get(LORATOOL_METADATA_KEY)
        except (OSError, ValueError, AttributeError):
            return None, False
        if not isinstance(record, dict) or not isinstance(record.get("recipe"), dict):
            return None, False
        return record["recipe"], bool(record.get("passed"))

    def _state(self, job: ResolvedJob, entry: Mapping[str, Any]) -> tuple[str, str]:
        folder = job.outputs[0]
        stored, passed = self.stored(Path(folder))
        state, reason = compare_entries(job.outputs, {folder: stored}, entry)
        if state == "skip" and not passed:
            return "redo", f"{Path(folder).name}: the last check failed"
        return state, reason

    def check(self, job: ResolvedJob) -> JobCheck:
        self.plan(job, None)
        state, reason = self._state(job, self.op.entry(job.options))
        return JobCheck(state, reason)  # type: ignore[arg-type]

    def run(self, job: ResolvedJob, progress: Progress | None = None) -> JobResult:
        from lora_tools.provenance import build_record

        start = time.perf_counter()
        entry = self.op.entry(job.options)
        state, reason = self._state(job, entry)
        if state == "skip":
            return JobResult(job.name, "skipped", time.perf_counter() - start, job.outputs, reason)
        from lora_tools.verify.out_folder import written_whole

        folder = Path(job.outputs[0])
        with written_whole(folder) as tmp:  # all or nothing, through the one output path
            report = self.op.run(self.plan(job, tmp)).report
            # the report names its files where they will be, not in the temp folder
            report.files = [str(folder / Path(f).relative_to(tmp)) for f in report.files]
            for image in report.images:
                if image.file is not None:
                    image.file = str(folder / Path(image.file).relative_to(tmp))
            record = build_record("verify", sources=[{"role": "model", "name": Path(job.options["model"]).name}],
                                  created=job.created, recipe=entry, passed=report.ok, verdict=report.verdict)
            data = {**report.to_dict(), LORATOOL_METADATA_KEY: record}
            (tmp / "report.json").write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        seconds = time.perf_counter() - start
        if not report.ok:
            worst = min((i.psnr_db for i in report.images if i.psnr_db is not None), default=None)
            why = "; ".join(report.failures) or (
                f"verdict {report.verdict}" + (f": worst PSNR {worst:.1f} dB < {report.threshold['psnr_db']:g} dB"
                                               if worst is not None and report.threshold else ""))
            return JobResult(job.name, "failed", seconds, job.outputs, f"{job.options['model']}: verify failed ({why}); "
                             f"see {folder / 'report.md'}")
        return JobResult(job.name, "done", seconds, job.outputs, reason if state == "redo" else "")


class PublishJob:
    """``publish`` jobs (see the module docstring)."""

    kind = "publish"

    def __init__(self, op: Operation) -> None:
        self.op = op
        self.kind = op.name

    def plan(self, job: ResolvedJob):
        return self.op.plan(self.op.options_model.model_validate(job.options), overwrite=True)

    @staticmethod
    def _state(job: ResolvedJob, plan: Any) -> tuple[str, str]:
        if job.options.get("dry_run"):
            return "run", "dry run"
        folder = Path(job.options["release_dir"])
        if not folder.exists():
            return "run", ""
        from lora_tools.publish import release_folder_of_ours

        why = release_folder_of_ours(folder)
        if why is not None:
            raise OutputExistsError(f"'{folder}' already exists and is not an earlier release of loratool's ({why}): "
                                    "nothing was removed; choose another release_dir.")
        card = folder / "README.md"
        if not card.is_file():
            return "redo", f"{folder.name}: the release has no card"
        have = sorted(p.name for p in folder.iterdir())
        if card.read_text(encoding="utf-8") != plan.card or have != sorted(n for n, _ in plan.listing()):
            return "redo", f"{folder.name}: the release differs (card or files)"
        return "skip", "up to date"

    def check(self, job: ResolvedJob) -> JobCheck:
        plan = self.plan(job).plan
        state, reason = self._state(job, plan)
        return JobCheck(state, reason, {str(plan.folder / n): b for n, b in plan.listing()}  # type: ignore[arg-type]
                        if not job.options.get("dry_run") else {})

    def run(self, job: ResolvedJob, progress: Progress | None = None) -> JobResult:
        start = time.perf_counter()
        planned = self.plan(job)
        plan = planned.plan
        state, reason = self._state(job, plan)
        if state == "skip":
            return JobResult(job.name, "skipped", time.perf_counter() - start, job.outputs, reason)
        listing = ", ".join(name for name, _ in plan.listing())
        if job.options.get("dry_run"):
            where = f" and upload them to {plan.repo}" if plan.repo else ""
            return JobResult(job.name, "done", time.perf_counter() - start, (),
                             f"dry run: would write {plan.folder.name}/ ({listing}){where}")
        result = self.op.run(planned)
        message = f"uploaded to {result.extra['url']}" if plan.repo else ""
        return JobResult(job.name, "done", time.perf_counter() - start, job.outputs, message)


__all__ = ["VerifyJob", "PublishJob"]
