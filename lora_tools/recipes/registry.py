"""The job adapters, derived from the operation registry, and the two functions every executor calls.

Each operation of :data:`lora_tools.ops.registry.OPS` gets the adapter for what it writes: model
files (``fuse``: whole records compared), one LoRA or JSON file (run entries compared), a report
folder (``verify``), a release folder (``publish``). A new operation needs no line here.
"""

from __future__ import annotations

import time

from lora_tools.errors import LoraToolsError
from lora_tools.ops.registry import OPS, Operation
from lora_tools.recipes.fuse_job import ModelJob
from lora_tools.recipes.jobs import JobAdapter, JobCheck, JobResult, Progress, ResolvedJob
from lora_tools.recipes.lora_jobs import LoraOpJob
from lora_tools.recipes.release_jobs import PublishJob, VerifyJob

_BY_OUTPUT: dict[str, type] = {"model": ModelJob, "lora": LoraOpJob, "json": LoraOpJob, "folder": VerifyJob,
                               "release": PublishJob}


def adapter_for(op: Operation) -> JobAdapter:
    """The adapter that runs jobs of ``op``."""
    adapter: JobAdapter = _BY_OUTPUT[op.writes](op)
    return adapter


#: Job kind -> adapter, one per operation.
ADAPTERS: dict[str, JobAdapter] = {name: adapter_for(op) for name, op in OPS.items()}


def check_job(job: ResolvedJob) -> JobCheck:
    """Plan ``job`` and say what running it would do (see :class:`JobCheck`)."""
    return ADAPTERS[job.kind].check(job)


def run_job(job: ResolvedJob, progress: Progress | None = None) -> JobResult:
    """Run ``job``: a failure becomes a ``failed`` result (the message names the file and the problem)."""
    start = time.perf_counter()
    try:
        return ADAPTERS[job.kind].run(job, progress)
    except LoraToolsError as e:
        return JobResult(job.name, "failed", time.perf_counter() - start, job.outputs, str(e))
    except OSError as e:
        return JobResult(job.name, "failed", time.perf_counter() - start, job.outputs, f"{type(e).__name__}: {e}")
    except (ValueError, RuntimeError) as e:  # raised inside a library (torch, diffusers): this job fails alone
        text = " ".join(str(e).split())[:300]
        return JobResult(job.name, "failed", time.perf_counter() - start, job.outputs,
                         f"{job.kind} of '{job.name}' stopped: {type(e).__name__}: {text}")


__all__ = ["ADAPTERS", "adapter_for", "check_job", "run_job"]
