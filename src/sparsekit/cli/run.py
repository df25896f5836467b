"""``sparsekit run RECIPE.yaml``: run a recipe (prune → fine-tune → compile → report).

The recipe is validated completely before any stage runs (:func:`sparsekit.recipe.load_recipe`:
every field, also those only the model can judge, on a fresh copy of it), so ``--check``
refuses what a run would; a bad field is one line naming it, exit status 2. ``out`` is
written last, after every stage that can fail, and never replaces the recipe file or its
``checkpoint``.
"""

from __future__ import annotations

import argparse
import os

from sparsekit.cli._output import check_output


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run a YAML recipe: prune, fine-tune, compile, report")
    p.add_argument("recipe", help="a YAML recipe (see examples/recipe.yaml)")
    p.add_argument("--check", action="store_true",
                   help="validate every field of the recipe and stop")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from sparsekit.recipe import load_recipe, run_recipe

    if not os.path.exists(args.recipe):  # a directory or a FIFO: load_recipe says which
        raise FileNotFoundError(f"recipe {args.recipe!r} does not exist")
    recipe = load_recipe(args.recipe)
    if recipe.out is not None:
        # the recipe file (and the fine-tuning data) are inputs too: out: naming the recipe
        # would replace it
        data_dir = None if recipe.finetune is None else recipe.finetune.data_dir
        check_output(recipe.out, inputs=[args.recipe, recipe.checkpoint, data_dir], flag="out:",
                     overwrite_flag=None)
    if args.check:
        print(f"{args.recipe}: valid recipe")
        return 0
    run_recipe(recipe)
    return 0
