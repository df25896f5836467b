"""prune(): one-shot, block-by-block pruning of a transformer with calibration data.

The embeddings run once to capture the inputs of block 0. Then, for each block in turn,
forward hooks gather its linear layers' input statistics (the block itself still dense),
every layer is pruned, and the *pruned* block's outputs become the inputs of the next
block. Only one block's activations (and its layers' Hessians) are alive at a time.

Non-finite values (NaN, inf) would prune arbitrarily, so they are refused with a
``ValueError`` naming where they are. Everything that can hold them is checked before
the first weight changes: the token ids, every parameter of the blocks, the inputs of
the first block; then each block's layer inputs are checked before that block is pruned,
and its new weights before they are written (a block is written whole or not at all).
Once every parameter and the first block's inputs are finite, a later block can only
see non-finite inputs if the *pruned* blocks before it overflow (half precision at a
high sparsity); that error says which blocks were already pruned, and those stay pruned.

With ``quantize="int8"`` every pruned layer also ends on a symmetric per-output-channel int8
grid (:func:`sparsekit.llm.methods.prune_layer`: SparseGPT compensates the rounding error
inside its update, magnitude and Wanda round to nearest) and carries the grid's scales
(:func:`sparsekit.quantize.attach_scales`), so :func:`sparsekit.compile` with
``weight_dtype="int8"`` stores exactly those codes. With ``group_size`` the grid has one
scale per row and group of ``group_size`` consecutive inputs instead (GPTQ's groups, e.g.
128: a tighter grid where a row mixes large and small inputs). The next block is calibrated
on the outputs of the pruned *and* rounded block.

Under ``torchrun`` (a default process group with several ranks) every rank holds the whole
model and the same calibration windows, and runs the blocks on its own share of the windows
(:func:`~sparsekit.llm.calibration.rank_share`). Each block's input statistics (the norms
Wanda needs, SparseGPT's sums XᵀX and their row counts) are summed over the ranks before it
is pruned, so every rank prunes from the same numbers to the same masks and weights: those
of one process calibrated on all the windows, up to the order of floating-point sums.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, closing
from typing import Any

import torch
from torch import nn

from sparsekit._checks import (
    ArgumentTypeError,
    check_device,
    check_int,
    check_materialized_module,
    check_seed,
    check_writable,
    devices_here,
)
from sparsekit.allocation import outlier_ratio, owl_sparsities
from sparsekit.blocks import BlockCall, capture_inputs, check_runs_once, find_blocks
from sparsekit.distributed import all_reduce_sum, check_same_on_ranks
from sparsekit.llm.blocks import DEFAULT_EXCLUDE, Layer, block_layers
from sparsekit.llm.calibration import (
    Calibration,
    calibration_tokens,
    check_token_ids,
    rank_share,
)
from sparsekit.llm.methods import METHODS, QUANTIZE, Method, check_quantize, prune_layer
from sparsekit.masks import MaskSet
from sparsekit.observe import InputStats, preserved, record
from sparsekit.patterns import NM, Pattern, Unstructured, parse_pattern
from sparsekit.prune import check_sparsity
from sparsekit.quantize import SCALE_NAME, attach_scales, detach_scales, guard_loading
from sparsekit.registry import Registry
from sparsekit.scores.wanda import wanda_scores
from sparsekit.targets import TargetSpec

ALLOCATIONS: Registry = Registry("allocation", meta={"outliers": False}, ordered=True)
"""Per-block sparsities ``fn(outlier_ratios, sparsity, weights=...) -> [sparsity of each
block]`` over the blocks that hold pruned layers, ``weights`` their numbers of pruned
weights (the mean weighted by them is ``sparsity``); ``outliers=True`` entries need the
blocks' outlier ratios (a dense Wanda pass first)."""
ALLOCATIONS.register("uniform")(
    lambda ratios, sparsity, weights=None: [float(sparsity)] * len(ratios))
ALLOCATIONS.register("owl", outliers=True)(owl_sparsities)
Progress = Callable[[int, int], None]


def prune(
    model: nn.Module,
    calibration: Calibration,
    *,
    method: str = "wanda",
    sparsity: float = 0.5,
    pattern: str | Pattern = "unstructured",
    allocation: str = "uniform",
    nsamples: int = 128,
    seqlen: int | None = None,
    tokenizer: Any = None,
    targets: TargetSpec | Sequence[TargetSpec] | None = None,
    exclude: str | Iterable[str] = DEFAULT_EXCLUDE,
    device: str | torch.device | None = None,
    seed: int = 0,
    batch_size: int = 8,
    progress: Progress | None = None,
    quantize: str | None = None,
    group_size: int | None = None,
) -> MaskSet:
    """Prune the linear layers of ``model``'s transformer blocks; return the applied masks.

    ``method`` is ``"magnitude"``, ``"wanda"`` or ``"sparsegpt"``; ``pattern`` is
    ``"unstructured"`` or N:M (exactly N of every M inputs kept: the sparsity is 1 − N/M
    and ``sparsity`` may not exceed it); ``allocation`` is ``"uniform"`` or ``"owl"`` (per-block
    sparsity from outlier ratios, unstructured only). ``calibration`` is a token tensor, a
    list of strings or a text file (then pass ``tokenizer``), see
    :func:`~sparsekit.llm.calibration.calibration_tokens`; its ids must be ones the model
    embeds. ``seqlen`` defaults to the model's context length (at most 2048) and may not
    exceed it. ``targets`` and ``exclude`` choose the layers as in :func:`sparsekit.prune`
    (a string is one entry); by default every Linear layer of the transformer blocks.
    With ``device``, each block is moved there while it is pruned, ``batch_size``
    calibration windows at a time. ``progress(done, total)`` is called after each block is
    pruned. Non-finite weights or activations are a ``ValueError``
    (see the module's notes).

    ``quantize="int8"`` rounds the kept weights of every pruned layer to a symmetric int8
    grid with one scale per output channel and attaches the scales as the float32 buffer
    ``weight_scale`` (see the module's notes); it needs ``nn.Linear`` layers. With
    ``group_size`` (an int dividing every pruned layer's ``in_features``) each row has one
    scale per group of ``group_size`` inputs: ``weight_scale`` is ``(out, in /
    group_size)``. The masks are the pruning decisions: a kept weight that rounds to zero
    stays kept. ``model``'s ``load_state_dict`` then refuses a ``weight_scale`` that is not
    positive and finite before it loads anything (:func:`sparsekit.quantize.guard_loading`).

    Under ``torchrun`` call it on every rank with the same model and calibration: each rank
    calibrates on its share of the windows (their number must be a multiple of the number
    of ranks), the statistics are summed over the ranks, and every rank ends with the same
    pruned model and masks (see the module's notes).

    Every argument is checked before the first weight changes: a bad one is a
    ``ValueError`` (an :class:`~sparsekit._checks.ArgumentTypeError` for a wrong type)
    naming it, and the model is left as it was.
    """
    if not isinstance(model, nn.Module):
        raise ArgumentTypeError(f"model must be an nn.Module (a transformers model), got "
                                f"{type(model).__name__}")
    if progress is not None and not callable(progress):
        raise ArgumentTypeError(f"progress must be None or a callable progress(done, total), "
                                f"got {progress!r}")
    # a model on the meta device (not loaded yet) failed with a raw Tensor.item() error
    check_materialized_module(model, "model: ")
    check_writable_module(model)
    dev = _check_device(device)
    check_quantize(quantize)
    if group_size is not None:
        check_int("group_size", group_size, minimum=1)
        if quantize is None:
            raise ValueError(f"group_size={group_size!r} sets the int8 grid's groups: it needs "
                             "quantize='int8' (accepted without it: group_size=None)")
    spec = METHODS.get(method)
    pat = check_options(sparsity, pattern, allocation)
    check_int("batch_size", batch_size, minimum=1)
    batch_size = int(batch_size)  # a NumPy int failed in Tensor.split with a raw TypeError
    check_seed("seed", seed)
    seqlen = check_seqlen(model, seqlen)
    blocks = find_blocks(model)
    layers = block_layers(model, blocks, targets, exclude)
    for layer in (x for block in layers for x in block):
        pat.check(layer.shape, layer.name)
        if quantize is not None and layer.transposed:
            raise ValueError(
                f"quantize={quantize!r} needs nn.Linear layers (per-output-channel scales in "
                f"the layout the engine compiles); {layer.name!r} is a "
                f"{type(layer.module).__name__}; accepted for this model: quantize=None "
                f"(values: None, {', '.join(map(repr, QUANTIZE))})"
            )
        if (quantize is not None and hasattr(layer.module, SCALE_NAME)
                and SCALE_NAME not in layer.module._buffers):
            # attach_scales refuses to replace it, once every block was pruned and rounded
            raise ValueError(
                f"quantize={quantize!r}: the layer of {layer.name!r} already has a "
                f"{SCALE_NAME} that is not int8 scales (a "
                f"{type(getattr(layer.module, SCALE_NAME)).__name__}), which the int8 grid's "
                "scales would replace; accepted: layers without one (remove it first), or "
                "quantize=None"
            )
        if group_size is not None and layer.shape[1] % group_size:
            raise ValueError(
                f"group_size must divide the inputs of every pruned layer (one scale per "
                f"group, the groups of a row equal); {layer.name!r} has {layer.shape[1]} "
                f"inputs, got group_size={group_size} (accepted: a divisor of every layer's "
                "in_features, or None for one scale per row)"
            )
    tokens = calibration_tokens(calibration, tokenizer=tokenizer, nsamples=nsamples,
                                seqlen=seqlen, seed=seed)
    # Under torchrun the ranks first agree on the windows and weights (or all raise), so
    # that the checks after them fail on every rank or on none.
    share = rank_share(tokens)
    inside = {id(p) for p in blocks.parameters()}
    check_same_on_ranks({n: p for n, p in model.named_parameters() if id(p) in inside},
                        "the blocks' weights", "load the same model on every rank")
    check_token_ids(tokens, model)
    _check_finite_parameters(model, blocks)
    _check_float32_range(layers, quantize)
    tokens = share

    def run(need: Method, report: Progress | None = None
            ) -> Iterator[tuple[int, dict[str, InputStats]]]:
        return _sequential(model, blocks, layers, tokens, need, dev, batch_size, report)

    masks: dict[str, torch.Tensor] = {}
    # The layers' new int8 grids (None: none), attached once preserved() has restored the
    # model's buffers: attached inside, a grid of a layer pruned again was overwritten by its
    # old scales (the weight left off its grid) or, of another shape, failed to restore. The
    # blocks written before an error keep theirs too.
    grids: list[tuple[nn.Module, torch.Tensor | None]] = []
    written = 0  # blocks pruned so far
    try:
        with preserved(model, train=False), torch.no_grad(), ExitStack() as steps:
            ratios = [0.0] * len(blocks)
            if ALLOCATIONS.meta(allocation)["outliers"]:  # from a dense pass of the unpruned model
                ratios = []
                for i, stats in steps.enter_context(closing(run(METHODS.get("wanda")))):
                    _check_inputs(layers[i], stats, pruned=0)
                    ratios.append(outlier_ratio([wanda_scores(x.weight(), stats[x.name])
                                                 for x in layers[i]]))
            # over the blocks that prune something, by how much each prunes: a block with
            # every layer excluded took OWL's sparsest share (its ratio 0), and the others'
            # mean missed the target (0.572 for 0.6)
            pruning = [i for i in range(len(blocks)) if layers[i]]
            shares = ALLOCATIONS.get(allocation)(
                [ratios[i] for i in pruning], sparsity,
                weights=[sum(x.shape[0] * x.shape[1] for x in layers[i]) for i in pruning])
            sparsities = [0.0] * len(blocks)
            for i, share in zip(pruning, shares, strict=True):
                sparsities[i] = share
            for i, stats in steps.enter_context(closing(run(spec, progress))):
                _check_inputs(layers[i], stats, pruned=i)
                new = []
                for layer in layers[i]:
                    w, keep, scales = prune_layer(spec, layer.weight(), stats.get(layer.name),
                                                  sparsities[i], pat, quantize, group_size)
                    new.append((layer, _check_weight(w, layer, method, pruned=i), keep, scales))
                for layer, w, keep, scales in new:  # the whole block, once all of it is checked
                    layer.set_weight(w)
                    grids.append((layer.module, scales))
                    masks[layer.name] = layer.to_storage(keep)
                written = i + 1
                del new  # before the next block's statistics are gathered
    except BaseException as err:
        # an error of a hook, of progress() or of the machine (KeyboardInterrupt, out of
        # memory) in block k left blocks 0 to k - 1 pruned without a word
        if written and f"blocks 0 to {written - 1} were already pruned" not in str(err):
            warnings.warn(f"llm.prune stopped after {written} of {len(blocks)} blocks "
                          f"({type(err).__name__}): {_already(written, hint=None)}",
                          RuntimeWarning, stacklevel=2)
        raise
    finally:
        for module, scales in grids:
            if scales is not None:
                attach_scales(module, scales)
            else:  # pruned again without quantizing: the weight left any earlier grid
                detach_scales(module)
    if quantize is not None:  # a bad weight_scale is refused before any tensor is loaded
        guard_loading(model)
    return MaskSet(model, masks, pattern=str(pat)).apply()


def check_writable_module(model: nn.Module) -> None:
    """:func:`~sparsekit._checks.check_writable` of every parameter and buffer of ``model``,
    each named ``"model: "`` + its name: a model built or loaded under
    ``torch.inference_mode`` failed outside it with PyTorch's raw "Inplace update to
    inference tensor" error, from the first weight written or buffer restored."""
    for name, tensor in (*model.named_parameters(), *model.named_buffers()):
        check_writable(f"model: {name}", tensor)


def check_options(sparsity: float, pattern: str | Pattern, allocation: str) -> Pattern:
    """Validate the options that do not depend on the model; return the parsed pattern."""
    check_sparsity(sparsity)
    if not isinstance(allocation, str):  # a list was a plain ValueError, as if misspelt
        raise ArgumentTypeError(f"unknown allocation {allocation!r} (a "
                                f"{type(allocation).__name__}, not a name); accepted: "
                                f"{', '.join(ALLOCATIONS)}")
    if allocation not in ALLOCATIONS:
        raise ValueError(f"unknown allocation {allocation!r}; accepted: {', '.join(ALLOCATIONS)}")
    pat = parse_pattern(pattern)
    if not isinstance(pat, (Unstructured, NM)):
        raise ValueError(f"pattern {pat.spec!r} is not supported here; accepted: "
                         "'unstructured' or N:M such as '2:4'")
    if isinstance(pat, NM):
        if allocation != "uniform":
            raise ValueError(f"allocation {allocation!r} needs pattern 'unstructured'")
        if sparsity > 1 - pat.n / pat.m:
            raise ValueError(f"sparsity {sparsity} exceeds what pattern {pat.spec!r} "
                             f"gives ({1 - pat.n / pat.m:g}); N:M masks keep exactly N of M")
    return pat


def _check_device(device: str | torch.device | None) -> torch.device | None:
    """``device`` as a ``torch.device`` that holds real tensors here (``None`` stays: each
    block runs where it is); ``"meta"`` has no values to calibrate on."""
    dev = check_device(device)
    if dev is not None and dev.type == "meta":
        raise ValueError(f"device {device!r} holds no values to calibrate on; accepted: None "
                         f"or {devices_here()}")
    return dev


def _sequential(
    model: nn.Module,
    blocks: nn.ModuleList,
    layers: list[list[Layer]],
    tokens: torch.Tensor,
    need: Method,
    device: torch.device | None,
    batch_size: int,
    progress: Progress | None,
) -> Iterator[tuple[int, dict[str, InputStats]]]:
    """Yield ``(i, stats)`` for each block; the caller prunes block ``i`` before resuming,
    and the block's outputs, recomputed after that, feed block ``i + 1``. Block ``i`` is
    on ``device`` meanwhile, and back where it was once it is done, fails or the caller
    closes this generator (:func:`contextlib.closing`: an error of the caller's while
    block ``i`` was out left it on ``device``)."""
    # Each block is replayed with the arguments of the first block of its attention type:
    # models that mix sliding-window and full attention (Gemma 2/3, Qwen2 with
    # use_sliding_window) pass each type its own mask and position embeddings, and block
    # 0's calibrated every block under its own mask. Errors of ids the model cannot take
    # name llm.prune's argument, not "inputs".
    kinds = _attention_types(model, blocks)
    firsts = {kind: kinds.index(kind) for kind in dict.fromkeys(kinds)}  # block 0's first
    check_runs_once(model, blocks, tokens[:batch_size], param="calibration")
    captured = capture_inputs(model, [blocks[i] for i in firsts.values()],
                              tokens.split(batch_size), device, param="calibration")
    calls_of = {kind: calls for kind, (_, calls) in zip(firsts, captured, strict=True)}
    hidden = captured[0][0]
    del captured  # the other blocks' hidden states: recomputed block by block
    bad = torch.tensor(sum(_non_finite(h) for h in hidden))
    all_reduce_sum(bad)  # every rank raises, or none does
    if bad:
        raise ValueError(
            f"calibration: the inputs of the first transformer block (the embeddings' output) "
            f"hold {bad} non-finite value(s) (NaN or inf); check the embedding weights "
            "(model.get_input_embeddings()); the model was not changed"
        )
    for i, block in enumerate(blocks):
        home = next(block.parameters()).device
        block.to(device or home)
        try:  # back home however the block ends (an error, the caller closing this early)
            stats: dict[str, InputStats] = {}
            calls = calls_of[kinds[i]]
            if need.stats and layers[i]:
                with record({x.name: x.module for x in layers[i]}, gram=need.gram) as stats:
                    _forward(block, hidden, calls)
                for s in stats.values():  # over all ranks' windows
                    s.all_reduce()
            yield i, stats
            del stats
            hidden = _forward(block, hidden, calls)
        finally:
            block.to(home)
        if progress is not None:
            progress(i + 1, len(blocks))


def _attention_types(model: nn.Module, blocks: nn.ModuleList) -> list[object]:
    """Each block's attention type: the ``layer_types`` of a Hugging Face config that has
    one entry per block (``"full_attention"``, ``"sliding_attention"``), else the blocks'
    own ``attention_type``; ``None`` where neither says (one type for every block)."""
    types = getattr(getattr(model, "config", None), "layer_types", None)
    if isinstance(types, (list, tuple)) and len(types) == len(blocks):
        return list(types)
    return [getattr(block, "attention_type", None) for block in blocks]


def _forward(block: nn.Module, hidden: list[torch.Tensor], calls: list[BlockCall]
             ) -> list[torch.Tensor]:
    return [call(block, h) for h, call in zip(hidden, calls, strict=True)]


def context_length(model: nn.Module) -> int:
    """The model's maximum sequence length from its config, at most 2048."""
    return min(max_positions(model) or 2048, 2048)


def max_positions(model: nn.Module) -> int | None:
    """The longest sequence ``model`` was built for (``config.max_position_embeddings`` or
    GPT-2's ``n_positions``); ``None`` when its config says neither."""
    config = getattr(model, "config", None)
    length = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions",
                                                                         None)
    return length if isinstance(length, int) and length > 0 else None


def check_seqlen(
    model: nn.Module, seqlen: int | None, *, minimum: int = 1, default: bool = True
) -> int:
    """``seqlen``, validated: an int from ``minimum`` to ``model``'s context (past it, the
    position embeddings fail with a bare ``IndexError``), or, when ``default``, ``None``
    for :func:`context_length`."""
    if default and seqlen is None:
        return context_length(model)
    check_int("seqlen", seqlen, minimum=minimum)
    limit = max_positions(model)
    if limit is not None and seqlen > limit:
        none = f", or None for {context_length(model)}" if default else ""
        raise ValueError(
            f"seqlen {seqlen} exceeds the model's context of {limit} tokens "
            f"(config.max_position_embeddings or n_positions); accepted: {minimum} to "
            f"{limit}{none}"
        )
    return seqlen


# -- non-finite values ------------------------------------------------------------------


def _non_finite(t: torch.Tensor) -> int:
    return int(t.numel() - torch.isfinite(t).sum()) if t.is_floating_point() else 0


def _check_finite_parameters(model: nn.Module, blocks: nn.ModuleList) -> None:
    """Raise naming the first parameter of the blocks that holds NaN or inf (it would make
    its block's outputs, and every later block's inputs, non-finite)."""
    inside = {id(p) for p in blocks.parameters()}
    for name, p in model.named_parameters():
        if id(p) in inside and (bad := _non_finite(p.detach())):
            raise ValueError(
                f"model: parameter {name!r} holds {bad} non-finite value(s) (NaN or inf); "
                "pruning needs finite weights; the model was not changed"
            )


def _check_float32_range(layers: list[list[Layer]], quantize: str | None) -> None:
    """Raise naming the first targeted weight with a magnitude float32 cannot hold.

    Pruning scores (Wanda's), SparseGPT's sweep and int8 scales and codes are float32,
    where such a value of a float64 model became infinite: a kept one failed as a
    non-finite weight, and ``quantize="int8"`` as one with no int8 code — after the blocks
    before it were already pruned.
    """
    most = torch.finfo(torch.float32).max
    for layer in (x for block in layers for x in block):
        w = layer.module.weight.detach()
        if not w.is_floating_point() or torch.finfo(w.dtype).max <= most or not w.numel():
            continue
        largest = float(w.abs().max())
        if largest > most:
            work = "pruning and int8 quantization compute" if quantize else "pruning computes"
            raise ValueError(
                f"model: parameter {layer.name!r} holds a magnitude of {largest:.3g}, beyond "
                f"float32's largest {most:.3g}, which {work} in; accepted: weights of "
                f"magnitude at most {most:.3g} (rescale the weight); the model was not changed"
            )


_OVERFLOWED = "their outputs overflowed: prune in float32 or at a lower sparsity"


def _already(pruned: int, hint: str | None = _OVERFLOWED) -> str:
    """What has changed when block ``pruned`` finds a fault (blocks before it are pruned),
    with ``hint`` (the likely cause) in parentheses."""
    if pruned == 0:
        return "the model was not changed"
    why = f" ({hint})" if hint else ""
    return (f"blocks 0 to {pruned - 1} were already pruned and stay pruned{why}; reload the "
            "model to retry")


def _check_inputs(layers: list[Layer], stats: dict[str, InputStats], pruned: int) -> None:
    """Raise naming the first layer the calibration never ran (no input rows: SparseGPT
    zeroed every weight of it, its Hessian all "dead" inputs, and Wanda kept arbitrary
    ones, its scores all zero, while the masks said half were kept), or whose calibration
    input statistics hold NaN or inf: inputs that do (their float64 squared sums show it),
    or finite ones whose products overflow the float32 Hessian, or nonzero ones whose squares
    underflow it."""
    for layer in layers:
        s = stats.get(layer.name)
        if s is None:
            continue
        if s.rows == 0:
            raise ValueError(
                f"calibration: {layer.name!r} received no inputs (the calibration windows "
                "never ran it), so this method has nothing to prune it by; accepted: "
                "calibration that runs every targeted layer, or leave it out with exclude="
                f"{layer.name.removesuffix('.weight')!r} (or method='magnitude'); "
                f"{_already(pruned, hint=None)}"
            )
        bad = _non_finite(s.sq)
        if bad:
            raise ValueError(
                f"calibration: the inputs of {layer.name!r} hold non-finite values (NaN or "
                f"inf; {bad} non-finite statistic(s)); {_already(pruned)}"
            )
        bad = 0 if s.gram is None else _non_finite(s.gram)
        if bad:
            raise ValueError(
                f"calibration: the inputs of {layer.name!r} are finite but too large for "
                f"their float32 Hessian ({bad} entries overflow: |x| above ~1.8e19); rescale "
                f"the model's activations; {_already(pruned)}"
            )
        lost = int(s.underflowed().sum())
        if lost:  # SparseGPT read them as always zero and zeroed the whole layer
            raise ValueError(
                f"calibration: {lost} inputs of {layer.name!r} are nonzero but too small for "
                "their float32 Hessian (their squares underflow: |x| below ~1e-19), which "
                "would count them as always zero and prune all their weights; rescale the "
                f"model's activations; {_already(pruned, hint=None)}"
            )


def _check_weight(w: torch.Tensor, layer: Layer, method: str, pruned: int) -> torch.Tensor:
    """``w`` in the layer's storage dtype, or a ``ValueError`` if it holds NaN or inf
    (an ill-conditioned reconstruction, or a value beyond the dtype's range)."""
    w = w.to(layer.module.weight.dtype)
    bad = _non_finite(w)
    if bad:
        raise ValueError(
            f"method {method!r} gave {bad} non-finite weight(s) (NaN or inf) for "
            f"{layer.name!r}; {_already(pruned)}"
        )
    return w
