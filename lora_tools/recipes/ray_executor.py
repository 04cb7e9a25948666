"""Run a recipe's jobs as Ray tasks: the same jobs, the same files, on a cluster.

Each :class:`~lora_tools.recipes.jobs.ResolvedJob` becomes one Ray task with resources from its kind
(fuse, merge, extract: CPUs and the plan's predicted peak memory; verify: one GPU). A job's
dependencies are passed to its task as object references, so Ray starts it after them; a job whose
dependency did not finish is ``not run``. Every task calls the same
:func:`~lora_tools.recipes.registry.run_job` as the local executor, which writes atomically and skips
outputs whose recorded recipe matches, so a file is the same bytes whichever executor made it.

Inputs and outputs are paths: every worker must see the same filesystem at the same paths (a shared
filesystem such as NFS, or one machine). A worker killed mid-job (node lost, SIGKILL) leaves only a
temp file of ours, which the retry removes; the task is retried ``retries`` times.

Without an address a local Ray instance is started (loopback only: no dashboard, no usage stats) and
shut down at the end; with one, the executor first checks that something answers there as a Ray
cluster does (a gRPC server, within ``connect_timeout`` seconds: Ray's own join waits minutes on a
wrong port), then joins that cluster and leaves it running.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlparse

from lora_tools.errors import ClusterError, UsageError
from lora_tools.io.remote import store_env
from lora_tools.recipes.executor import EventHook
from lora_tools.recipes.jobs import JobResult, ResolvedJob
from lora_tools.recipes.registry import run_job
from lora_tools.testing.hooks import kill_once_progress

logger = logging.getLogger(__name__)

#: Resources a task of each kind asks for (before the plan's memory); kinds not listed ask for one CPU.
KIND_RESOURCES: dict[str, dict[str, float]] = {
    "fuse": {"num_cpus": 2},
    "extract": {"num_cpus": 2},
    "merge": {"num_cpus": 1},
    "verify": {"num_cpus": 1, "num_gpus": 1},
}
#: How long joining a cluster may take before it is reported unreachable.
CONNECT_TIMEOUT_S = 10.0


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise UsageError("the Ray executor needs Ray, which is not installed: pip install 'lora-tools[ray]'.") from None
    return ray


def run_on_worker(job: ResolvedJob, *dependencies: JobResult) -> JobResult:
    """The task body: ``not run`` when a dependency did not finish, else :func:`run_job` (progress off)."""
    blocked = [d for d in dependencies if d.outcome in ("failed", "not run")]
    if blocked:
        return JobResult(job.name, "not run", 0.0, job.outputs, f"needs '{blocked[0].name}', which did not finish")
    return run_job(job, kill_once_progress())


#: An HTTP/2 client preface and an empty SETTINGS frame: a gRPC server (a Ray GCS or Ray Client server)
#: answers it with a SETTINGS frame of its own.
_H2_HELLO = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
_H2_SETTINGS = 0x4


def _probe(address: str, timeout: float) -> None:
    """Fail fast, with one line, when no Ray cluster answers at ``address`` (Ray itself retries for minutes).

    Nothing listening is refused at once; something listening that is not a gRPC server (a Ray GCS
    and a Ray Client server both are) is refused after at most ``timeout`` seconds, where joining it
    would hang.
    """
    if address == "auto":
        return
    parsed = urlparse(address if "://" in address else f"ray://{address}")
    try:
        host, port = parsed.hostname, parsed.port
    except ValueError:
        host = port = None
    if not host or not port:
        raise ClusterError(f"Ray address '{address}' is not HOST:PORT (or ray://HOST:PORT).")
    deadline = time.monotonic() + timeout
    try:
        conn = socket.create_connection((host, port), timeout=timeout)
    except OSError as e:
        reason = e.strerror or ("timed out" if isinstance(e, TimeoutError) else type(e).__name__)
        raise ClusterError(
            f"no Ray cluster reachable at '{address}' ({reason} after at most {timeout:.0f} s).") from None
    head = b""
    with conn:
        try:
            conn.sendall(_H2_HELLO)
            while len(head) < 9:
                conn.settimeout(max(0.01, deadline - time.monotonic()))
                chunk = conn.recv(9 - len(head))
                if not chunk:
                    break
                head += chunk
        except OSError:
            pass  # reset or silent: not a gRPC server
    if len(head) < 9 or head[3] != _H2_SETTINGS:
        raise ClusterError(f"no Ray cluster at '{address}': something listens there but does not answer as Ray "
                           f"does (gRPC) within {timeout:.0f} s.")


class RayExecutor:
    """Runs resolved jobs as Ray tasks (see the module docstring).

    Args:
        address: a running cluster (``HOST:PORT``, ``ray://HOST:PORT`` or ``auto``); ``None`` starts a
            local instance on 127.0.0.1 for this run (or uses one this process already started).
        max_in_flight: at most this many jobs submitted at once per node (``None``: as resources allow).
        retries: how often a task whose worker died is run again.
        peak_bytes: job name -> predicted peak memory (the recipe plan's), asked of Ray as ``memory``.
        num_cpus / num_gpus / resources: what a local instance declares (defaults: the machine's CPUs,
            no GPU); ignored when joining a cluster.
        connect_timeout: seconds to wait for a cluster address to answer.
    """

    def __init__(self, *, address: str | None = None, max_in_flight: int | None = None, retries: int = 1,
                 peak_bytes: Mapping[str, int | None] | None = None, num_cpus: int | None = None,
                 num_gpus: int | None = None, resources: Mapping[str, float] | None = None,
                 connect_timeout: float = CONNECT_TIMEOUT_S) -> None:
        if max_in_flight is not None and max_in_flight < 1:
            raise UsageError(f"max_in_flight must be at least 1, not {max_in_flight}")
        if retries < 0:
            raise UsageError(f"retries must be 0 or more, not {retries}")
        self.address = address
        self.max_in_flight = max_in_flight
        self.retries = retries
        self.peak_bytes = dict(peak_bytes or {})
        self.num_cpus = num_cpus
        self.num_gpus = num_gpus
        self.resources = dict(resources or {})
        self.connect_timeout = connect_timeout

    # -- session ---------------------------------------------------------------------------------
    def _start(self, ray: Any) -> bool:
        """Connect or start Ray; ``True`` when this call started it (and must shut it down)."""
        if self.address is not None:
            _probe(self.address, self.connect_timeout)
        if ray.is_initialized():
            return False
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        quiet = {"include_dashboard": False, "configure_logging": False, "log_to_driver": False,
                 "logging_level": logging.ERROR}
        if self.address is None:
            ray.init(num_cpus=self.num_cpus or os.cpu_count() or 1, num_gpus=self.num_gpus or 0,
                     resources=self.resources or None, _node_ip_address="127.0.0.1", **quiet)
        else:
            try:
                ray.init(address=self.address, **quiet)
            except (ConnectionError, RuntimeError) as e:
                raise ClusterError(f"could not join the Ray cluster at '{self.address}': {' '.join(str(e).split())[:200]}.") from None
        return True

    def _options(self, ray: Any, job: ResolvedJob, totals: Mapping[str, float]) -> dict[str, Any]:
        opts: dict[str, Any] = {"max_retries": self.retries, "retry_exceptions": False}
        for key, value in KIND_RESOURCES.get(job.kind, {"num_cpus": 1}).items():
            have = totals.get("CPU" if key == "num_cpus" else "GPU", 0.0)
            if key == "num_cpus":
                opts[key] = max(1.0, min(value, have or 1.0))  # a 1-CPU node still runs a fuse
            else:
                opts[key] = value  # no GPU in the cluster: Ray says the task cannot be scheduled
        env = store_env([job.options, job.outputs])  # workers reach the object store this driver reaches
        if env:
            opts["runtime_env"] = {"env_vars": env}
        peak = self.peak_bytes.get(job.name)
        memory = totals.get("memory")
        if peak and memory:
            opts["memory"] = int(min(peak, memory))
        return opts

    # -- run -------------------------------------------------------------------------------------
    def execute(self, jobs: Sequence[ResolvedJob], *, fail_fast: bool = False,
                on_event: EventHook | None = None) -> list[JobResult]:
        ray = _import_ray()
        started = self._start(ray)
        try:
            return self._execute(ray, jobs, fail_fast, on_event)
        finally:
            if started:
                ray.shutdown()

    def _execute(self, ray: Any, jobs: Sequence[ResolvedJob], fail_fast: bool,
                 on_event: EventHook | None) -> list[JobResult]:
        totals = ray.cluster_resources()
        nodes = max(1, sum(1 for n in ray.nodes() if n.get("Alive")))
        limit = self.max_in_flight * nodes if self.max_in_flight else len(jobs) or 1
        task = ray.remote(run_on_worker)
        refs: dict[str, Any] = {}
        pending: dict[Any, ResolvedJob] = {}
        results: dict[str, JobResult] = {}
        queue = list(jobs)  # dependencies first (the planner's order)
        stop = False
        submitted_at: dict[str, float] = {}

        def finish(job: ResolvedJob, result: JobResult) -> None:
            results[job.name] = result
            if on_event:
                on_event(job, "end", result)

        while queue or pending:
            while queue and len(pending) < limit and not stop:
                job = queue.pop(0)
                deps = [refs[d] for d in job.depends_on if d in refs]
                ref = task.options(**self._options(ray, job, totals)).remote(job, *deps)
                refs[job.name] = ref
                pending[ref] = job
                submitted_at[job.name] = time.perf_counter()
                if on_event:
                    on_event(job, "start", None)
            if stop:
                for job in queue:
                    finish(job, JobResult(job.name, "not run", 0.0, job.outputs, "an earlier job failed (fail_fast)"))
                queue.clear()
            if not pending:
                break
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                job = pending.pop(ref)
                finish(job, self._result(ray, ref, job, time.perf_counter() - submitted_at[job.name]))
                if fail_fast and results[job.name].outcome == "failed":
                    stop = True
        return [results[j.name] for j in jobs]

    def _result(self, ray: Any, ref: Any, job: ResolvedJob, seconds: float) -> JobResult:
        try:
            return ray.get(ref)
        except ray.exceptions.WorkerCrashedError:
            why = f"its worker died {self.retries + 1} time(s) (retries={self.retries})"
        except ray.exceptions.RayTaskError as e:
            cause = e.cause if getattr(e, "cause", None) is not None else e
            why = f"{type(cause).__name__}: {' '.join(str(cause).split())[:300]}"
        except ray.exceptions.RayError as e:
            why = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
        return JobResult(job.name, "failed", seconds, job.outputs, why)


__all__ = ["RayExecutor", "run_on_worker", "KIND_RESOURCES"]
