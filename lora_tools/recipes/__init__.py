"""YAML recipes: many jobs (fuse, rescale, resize, merge, convert, extract, analyze, verify, publish)
said once, validated whole, run resumably.

Example:
    >>> from lora_tools.recipes import plan_recipe, run_recipe
    >>> plan = plan_recipe("recipes/lightning-4step.yaml", sets=["base=juggernaut.safetensors"])
    >>> results = run_recipe(plan)          # skips outputs that are already up to date
"""

from lora_tools.recipes.executor import Executor, LocalExecutor
from lora_tools.recipes.jobs import JobCheck, JobResult, ResolvedJob
from lora_tools.recipes.registry import check_job, run_job
from lora_tools.recipes.run import RecipePlan, plan_recipe, run_recipe
from lora_tools.recipes.show import dump_recipe, recipe_from_record, recipe_of_file

__all__ = ["plan_recipe", "run_recipe", "RecipePlan", "Executor", "LocalExecutor", "ResolvedJob", "JobCheck",
           "JobResult", "check_job", "run_job", "recipe_of_file", "recipe_from_record", "dump_recipe"]
