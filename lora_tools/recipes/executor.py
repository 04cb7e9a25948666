"""The executor interface: plan all jobs, run each, collect results.

An executor gets the resolved jobs (plain data, see :class:`~lora_tools.recipes.jobs.ResolvedJob`)
in an order where every job comes after the jobs it depends on, and returns one
:class:`~lora_tools.recipes.jobs.JobResult` per job. It knows nothing about job kinds: it calls
:func:`~lora_tools.recipes.registry.run_job`. A distributed executor (Ray: ``ray.remote(run_job)``,
waiting on a job's dependencies' results) implements the same :class:`Executor` protocol.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from lora_tools.recipes.jobs import JobResult, Progress, ResolvedJob
from lora_tools.recipes.registry import run_job

#: ``on_event(job, "start" | "end", result_or_None)``: for progress displays.
EventHook = Callable[[ResolvedJob, str, "JobResult | None"], None]
#: ``progress_for(job) -> advance(nbytes)`` or ``None``: a per-job byte progress callback.
ProgressFactory = Callable[[ResolvedJob], "Progress | None"]


class Executor(Protocol):
    """Runs resolved jobs and returns their results, one per job, in the jobs' order."""

    def execute(self, jobs: Sequence[ResolvedJob], *, fail_fast: bool = False,
                on_event: EventHook | None = None) -> list[JobResult]:
        """Run ``jobs`` (dependencies first). A job whose dependency failed is ``not run``;
        with ``fail_fast`` the first failure leaves every later job ``not run``."""


class LocalExecutor:
    """Runs jobs one after another in this process.

    Args:
        progress_for: optional per-job byte-progress factory (the CLI passes a tqdm bar).
    """

    def __init__(self, progress_for: ProgressFactory | None = None) -> None:
        self.progress_for = progress_for

    def execute(self, jobs: Sequence[ResolvedJob], *, fail_fast: bool = False,
                on_event: EventHook | None = None) -> list[JobResult]:
        results: dict[str, JobResult] = {}
        stop = False
        for job in jobs:
            blocked = [d for d in job.depends_on if d in results and results[d].outcome in ("failed", "not run")]
            if stop or blocked:
                why = "an earlier job failed (fail_fast)" if stop else f"needs '{blocked[0]}', which did not finish"
                results[job.name] = JobResult(job.name, "not run", 0.0, job.outputs, why)
                if on_event:
                    on_event(job, "end", results[job.name])
                continue
            if on_event:
                on_event(job, "start", None)
            progress = self.progress_for(job) if self.progress_for else None
            result = run_job(job, progress)
            results[job.name] = result
            if on_event:
                on_event(job, "end", result)
            if result.outcome == "failed" and fail_fast:
                stop = True
        return [results[j.name] for j in jobs]


__all__ = ["Executor", "LocalExecutor", "EventHook"]
