"""``loratool run``: run a YAML recipe (validated whole first; up-to-date outputs are skipped)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from lora_tools.cli._options import is_quiet, quiet_flag, written
from lora_tools.cli._output import safe_text
from lora_tools.units import format_bytes

if TYPE_CHECKING:
    from lora_tools.recipes.executor import Executor


@click.command("run")
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=str))
@click.option("--dry-run", is_flag=True, help="Print the expanded jobs (outputs, sizes, peak memory, what would run) and write nothing.")
@click.option("--only", multiple=True, metavar="NAME", help="Run only the jobs with this name (glob pattern). Repeatable.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Override an input's path (NAME=PATH, its sha256 pin kept), a var, output_dir, or any dotted key. Repeatable.")
@click.option("--fail-fast", is_flag=True, help="Stop at the first failed job (default: run the others).")
@click.option("--json", "as_json", is_flag=True, help="Print the plan or the results as JSON on stdout.")
@quiet_flag
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="Where jobs run: this process, or Ray tasks (pip install 'lora-tools[ray]').")
@click.option("--address", metavar="ADDR", help="With --executor ray: join this cluster (HOST:PORT, ray://HOST:PORT, auto); "
              "default: start a local Ray instance on 127.0.0.1 for this run.")
@click.option("--max-in-flight", type=click.IntRange(min=1), metavar="N", help="With --executor ray: at most N jobs at once per node.")
@click.option("--retries", type=click.IntRange(min=0), default=1, show_default=True,
              help="With --executor ray: how often a job whose worker died is run again.")
def run_command(recipe: str, dry_run: bool, only: tuple[str, ...], sets: tuple[str, ...], fail_fast: bool,
                as_json: bool, executor: str, address: str | None, max_in_flight: int | None,
                retries: int) -> None:
    """Run the jobs of RECIPE (a YAML file that starts with "version: 1").

    \b
    Example:
        loratool run recipes/lightning-4step.yaml --set base=juggernaut.safetensors
        loratool run recipes/publisher-batch.yaml --dry-run
    """
    from lora_tools.recipes.run import plan_recipe, run_recipe

    plan = plan_recipe(recipe, sets=sets, only=only)
    jobs = plan.jobs
    quiet = is_quiet()
    if dry_run:
        if as_json or not quiet:  # a dry run writes nothing: under -q it prints nothing
            _print_plan(plan, jobs, as_json)
        return
    from lora_tools.cli._progress import byte_progress

    bars: list = []

    def progress_for(job):
        check = plan.checks.get(job.name)
        total = sum(check.output_bytes.values()) if check else 0
        ctx = byte_progress(total, job.name, enabled=not quiet and not as_json)
        bars.append(ctx)
        return ctx.__enter__()

    def on_event(job, what, result):
        if what == "end":
            while bars:
                bars.pop().__exit__(None, None, None)
            if not as_json and not quiet and result is not None:
                click.echo(f"[{result.outcome}] {safe_text(job.name)}" + (f": {safe_text(result.message)}" if result.message else ""),
                           err=True)

    chosen: Executor
    if executor == "ray":
        from lora_tools.recipes.ray_executor import RayExecutor

        # Workers show no progress bars; the driver prints one line per finished job.
        chosen = RayExecutor(address=address, max_in_flight=max_in_flight, retries=retries,
                             peak_bytes={name: c.peak_bytes for name, c in plan.checks.items()})
    else:
        if address or max_in_flight:
            raise click.UsageError("--address and --max-in-flight go with --executor ray.")
        from lora_tools.recipes.executor import LocalExecutor

        chosen = LocalExecutor(progress_for)
    results = run_recipe(plan, executor=chosen, fail_fast=fail_fast, on_event=on_event)
    if as_json:
        click.echo(json.dumps({"results": [{"name": r.name, "outcome": r.outcome, "seconds": round(r.seconds, 3),
                                            "outputs": list(r.outputs), "message": r.message} for r in results]},
                              indent=2))
    elif quiet:  # the outputs of the jobs that ran; each failure as an error
        written(o for r in results if r.outcome == "done" for o in r.outputs)
        for r in results:
            if r.outcome == "failed":
                click.echo(f"Error: {safe_text(r.name)}: {safe_text(r.message)}", err=True)
    else:
        _print_summary(results)
    if any(r.outcome in ("failed", "not run") for r in results):
        failed = sum(r.outcome == "failed" for r in results)
        click.echo(f"Error: {failed} of {len(results)} jobs failed.", err=True)
        sys.exit(1)


def _print_plan(plan, jobs, as_json: bool) -> None:
    rows = []
    for job in jobs:
        check = plan.checks.get(job.name)
        rows.append({"name": job.name, "kind": job.kind, "state": check.state if check else "pending",
                     "reason": check.reason if check else "", "depends_on": list(job.depends_on),
                     "outputs": [{"path": o, "bytes": (check.output_bytes.get(o) if check else None)} for o in job.outputs],
                     "peak_bytes": check.peak_bytes if check else None, "options": job.options})
    if as_json:
        click.echo(json.dumps({"recipe": str(plan.path), "output_dir": str(plan.output_dir), "jobs": rows}, indent=2))
        return
    click.echo(f"Recipe: {safe_text(plan.path)} ({len(jobs)} jobs, outputs in {safe_text(plan.output_dir)})")
    for row in rows:
        peak = f", peak memory about {format_bytes(row['peak_bytes'])}" if row["peak_bytes"] else ""
        click.echo(f"{safe_text(row['name'])} ({row['kind']}): {row['state']}"
                   + (f" ({safe_text(row['reason'])})" if row["reason"] and row["state"] != "run" else "") + peak)
        for o in row["outputs"]:
            size = f" (about {format_bytes(o['bytes'])})" if o["bytes"] is not None else ""
            click.echo(f"  -> {safe_text(Path(o['path']))}{size}")
    click.echo("Dry run: nothing was written.")


def _print_summary(results) -> None:
    width = max([len(r.name) for r in results] + [3])
    click.echo(f"{'job':<{width}}  {'state':<8}  {'time':>7}  output")
    for r in results:
        out = ", ".join(safe_text(Path(o).name) for o in r.outputs)
        click.echo(f"{safe_text(r.name):<{width}}  {r.outcome:<8}  {r.seconds:>6.1f}s  {out}")
        if r.message and r.outcome != "skipped":
            click.echo(f"{'':<{width}}  {safe_text(r.message)}")
    counts = {k: sum(r.outcome == k for r in results) for k in ("done", "skipped", "failed", "not run")}
    click.echo(", ".join(f"{n} {k}" for k, n in counts.items() if n) + ".")
