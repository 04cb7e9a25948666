"""``loratool recipe show``: the recipe that made a file (runnable with ``loratool run``)."""

from __future__ import annotations

import json

import click

from lora_tools.cli._options import quiet_flag


@click.group("recipe")
def recipe_group() -> None:
    """Recipes: show the recipe that made a file.

    \b
    Example:
        loratool recipe show juggernaut-lightning-4step.safetensors > rebuild.yaml
    """


@recipe_group.command("show")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print the recipe as JSON instead of YAML.")
@quiet_flag  # the recipe is what this command gives: -q prints it too (README "Quiet output")
def show_command(file: str, as_json: bool) -> None:
    """Print the recipe that made FILE (from its loratool record; also for `loratool fuse` outputs).

    Save it next to the inputs and run it with `loratool run` to rebuild the file bit for bit
    (inputs elsewhere: --set NAME=PATH).

    \b
    Example:
        loratool recipe show juggernaut-lightning-4step.safetensors > rebuild.yaml
    """
    from lora_tools.recipes.show import dump_recipe, recipe_of_file

    recipe = recipe_of_file(file)
    click.echo(json.dumps(recipe, indent=2) if as_json else dump_recipe(recipe), nl=as_json)
