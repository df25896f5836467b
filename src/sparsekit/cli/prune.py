"""``sparsekit prune CKPT --out OUT``: one-shot pruning of a saved model.

Every check runs before the work and the output is written last, so a mistake anywhere
leaves no output; ``OUT`` never replaces ``CKPT`` unless ``--overwrite`` is given.
"""

from __future__ import annotations

import argparse

from torch import nn

import sparsekit
from sparsekit._checks import check_seed, check_sparsity
from sparsekit.allocation import ALLOCATIONS
from sparsekit.cli._errors import UsageError
from sparsekit.cli._model import add_checkpoint_arguments, example_inputs, load_checkpoint
from sparsekit.cli._output import check_output, write_output
from sparsekit.cli.report import pruned_sparsity, show
from sparsekit.data.images import check_image_root
from sparsekit.patterns import parse_pattern
from sparsekit.prune import check_pattern
from sparsekit.scores import CRITERIA
from sparsekit.targets import resolve_targets
from sparsekit.training import minibatches

CALIB_BATCHES = 4  # --calib-batches when not given


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prune", help="prune a checkpoint one-shot and save it compressed")
    add_checkpoint_arguments(p, "input checkpoint (sparsekit or plain safetensors)")
    p.add_argument("--out", help="output checkpoint path (required unless --dry-run)")
    p.add_argument("--dry-run", action="store_true",
                   help="prune in memory and print the report; write nothing")
    p.add_argument("--overwrite", action="store_true",
                   help="allow --out to be CKPT itself (replaced atomically, at the end)")
    p.add_argument("--sparsity", type=float, required=True, help="target sparsity in [0, 1)")
    p.add_argument("--method", "--criterion", dest="method", default="magnitude",
                   help=f"the scoring method, one of {', '.join(CRITERIA)} "
                   "(--criterion is its older spelling)")
    p.add_argument("--allocation", default="uniform", help=f"one of {', '.join(ALLOCATIONS)}")
    p.add_argument("--pattern", default="unstructured",
                   help="unstructured, N:M (e.g. 2:4), block:RxC or row")
    p.add_argument("--exclude", action="append", default=[], help="name/glob to leave dense")
    p.add_argument("--data-dir", help="image dataset for data-driven criteria "
                   "(default: Fashion-MNIST, else digits)")
    p.add_argument("--calib-batches", type=int,
                   help=f"calibration batches of 128 for data-driven criteria (default: "
                   f"{CALIB_BATCHES})")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=run)


def _check_options(args: argparse.Namespace) -> None:
    """Refuse a bad pruning option by its flag before the checkpoint is loaded: the
    library's own checks ran after it and named its parameter (``sparsity must be …``,
    ``unknown criterion``), not the flag."""
    check_sparsity(args.sparsity, "--sparsity")
    check_seed("--seed", args.seed)
    for flag, value, table in (("--method", args.method, CRITERIA),
                               ("--allocation", args.allocation, ALLOCATIONS)):
        if value not in table:
            raise UsageError(f"{flag} {value!r} is unknown; accepted: "
                             f"{', '.join(table.names())}")
    try:
        parse_pattern(args.pattern)
    except ValueError as err:
        raise UsageError(f"--pattern {args.pattern!r}: {err}") from None


def _check_fits(args: argparse.Namespace, model: nn.Module) -> None:
    """Refuse ``--exclude`` and ``--pattern`` values the model cannot take by their flags
    (``sparsekit.prune`` named its parameters: "exclude entry 'x' matches none …",
    "pattern 'block:7x7' does not divide …"), before any data is read."""
    try:
        chosen = resolve_targets(model, exclude=args.exclude)
    except ValueError as err:  # no default targets at all is the model's, not the flag's
        raise UsageError(f"--exclude: {err}" if args.exclude else f"model: {err}") from None
    try:
        check_pattern(parse_pattern(args.pattern), chosen)
    except ValueError as err:
        raise UsageError(f"--pattern {args.pattern!r}: {err}") from None


def run(args: argparse.Namespace) -> int:
    if args.out is None and not args.dry_run:
        raise UsageError("--out is required (or pass --dry-run to write nothing)")
    if args.calib_batches is not None and args.calib_batches < 1:
        raise UsageError(f"--calib-batches must be ≥ 1, got {args.calib_batches}")
    _check_options(args)
    # the dataset is an input too: --out DATA/train-images-idx3-ubyte.gz replaced it
    out = None if args.out is None else check_output(args.out, inputs=[args.ckpt, args.data_dir],
                                                     overwrite=args.overwrite)
    for flag, given in (("--data-dir", args.data_dir), ("--calib-batches", args.calib_batches)):
        if given is not None and not CRITERIA.meta(args.method)["data_driven"]:
            # was read by no one: a data-free method pruned as if the flag were not given
            raise UsageError(f"{flag} applies to data-driven methods "
                             f"({', '.join(CRITERIA.names(data_driven=True))}); --method "
                             f"{args.method!r} reads no data")
    if args.data_dir is not None:  # "root 'x' lacks the IDX files …" named no flag
        check_image_root(args.data_dir, "--data-dir")
    model, _ = load_checkpoint(args.ckpt, args.model)
    _check_fits(args, model)
    example = example_inputs(args.input_shape, model)
    data = None
    if CRITERIA.meta(args.method)["data_driven"]:
        from sparsekit.data import load_image_dataset

        train = load_image_dataset(args.data_dir).train
        batches = CALIB_BATCHES if args.calib_batches is None else args.calib_batches
        data = [b for _, b in zip(range(batches), minibatches(train, 128))]
    masks = sparsekit.prune(
        model, args.sparsity, method=args.method, allocation=args.allocation,
        pattern=args.pattern, exclude=args.exclude, data=data, seed=args.seed,
    )
    rep = sparsekit.report(model, example, masks=masks)
    if args.dry_run:
        show(rep, markdown=args.markdown)
        print(f"dry run: would write {out or 'nothing'} ({pruned_sparsity(masks)}); "
              "nothing written")
        return 0
    out = write_output(out, lambda path: sparsekit.save(model, path, masks))
    show(rep, markdown=args.markdown)
    print(f"wrote {out} ({out.stat().st_size:,} bytes, {pruned_sparsity(masks)})")
    return 0
