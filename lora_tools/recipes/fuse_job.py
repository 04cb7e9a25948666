"""The adapter of operations that write model files (``fuse``): plan through the operation, compare the
record each output would hold with the one it holds, run unless up to date."""

from __future__ import annotations

import time

from lora_tools.ops.registry import Operation
from lora_tools.recipes.jobs import JobCheck, JobResult, Progress, ResolvedJob, compare_outputs


class ModelJob:
    """Jobs of an operation writing model files: :func:`lora_tools.ops.fuse_plan.plan_fuse` then
    :func:`lora_tools.ops.fuse.run_fuse` for ``fuse``. The outputs are the ones the plan names
    (:func:`lora_tools.ops.fuse_plan.fuse_output_paths`, the names the recipe checked)."""

    def __init__(self, op: Operation) -> None:
        self.op = op
        self.kind = op.name

    def plan(self, job: ResolvedJob):
        return self.op.plan(self.op.options_model.model_validate(job.options), overwrite=True)

    def check(self, job: ResolvedJob) -> JobCheck:
        planned = self.plan(job)
        try:
            state, reason = compare_outputs(job.outputs, planned.record(job.created))
            sizes = {str(s.path): planned.plan.output_bytes(s.kind) for s in planned.plan.outputs}
            return JobCheck(state, reason, sizes, planned.plan.predicted_peak_bytes())
        finally:
            planned.close()

    def run(self, job: ResolvedJob, progress: Progress | None = None) -> JobResult:
        start = time.perf_counter()
        planned = self.plan(job)
        try:
            state, reason = compare_outputs(job.outputs, planned.record(job.created))
            if state == "skip":
                return JobResult(job.name, "skipped", time.perf_counter() - start, job.outputs, reason)
            self.op.run(planned, progress=progress, created=job.created)
            return JobResult(job.name, "done", time.perf_counter() - start, job.outputs,
                             reason if state == "redo" else "")
        finally:
            planned.close()


__all__ = ["ModelJob"]
