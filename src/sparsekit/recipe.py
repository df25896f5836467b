"""Recipes: prune → fine-tune schedule → compile → report, described in YAML.

A recipe names a registered model (:mod:`sparsekit.models`) and optionally a checkpoint
to start from, then the stages to run, each resolved by the same registry names as the
Python API and the CLI (``"magnitude"``, ``"erk"``, ``"2:4"``)::

    model: lenet_300_100
    prune: {sparsity: 0.9, method: magnitude, allocation: global}
    finetune: {epochs: 2, lr: 0.001, schedule: gradual}
    compile: {formats: auto, rows: [1, 64]}
    report: {markdown: true}
    out: pruned.safetensors

:func:`load_recipe` validates a file with pydantic before anything runs: every error
names the field (``prune.sparsity: …``) and unknown fields and repeated keys are refused,
so a typo is not silently ignored. Types are strict, as in the Python API: ``true`` is not
a number, ``1.0`` not an int, ``'yes'`` not a bool. What only the model can judge (the
``exclude`` names, whether the ``pattern`` divides its weights, the ``checkpoint``, the
``input_shape``, whether forced ``compile.formats`` can hold a pruned layer) is checked on a
fresh copy of the model, so ``sparsekit run --check`` catches it too, and so is whether
``out`` can be written. :func:`run_recipe` runs it (``sparsekit run recipe.yaml``) and
writes ``out`` last, after every stage that can fail.
"""

from __future__ import annotations

import contextlib
import os
import re
import reprlib
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import torch
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

import sparsekit
from sparsekit import checkpoint as _checkpoint
from sparsekit._atomic import lands_on, write_target
from sparsekit._checks import MAX_EPOCHS, MAX_SEED, ArgumentTypeError, model_errors
from sparsekit.allocation import ALLOCATIONS
from sparsekit.data.images import check_image_root
from sparsekit.engine.compile import check_rows, formats_fit
from sparsekit.engine.formats import check_formats
from sparsekit.models import MODELS, create_model
from sparsekit.patterns import parse_pattern
from sparsekit.prune import check_pattern
from sparsekit.registry import Registry
from sparsekit.scores import CRITERIA
from sparsekit.targets import resolve_targets

__all__ = ["Recipe", "load_recipe", "run_recipe"]


def _not_blank(value: str | None, what: str) -> str | None:
    """``value`` unless it is an empty or blank path, which ``Path`` reads as ``"."``: a
    ``ValueError`` saying it must be ``what``."""
    if value is not None and not value.strip():
        raise ValueError(f"must be {what}, got {value!r}")
    return value


def _registered(table: Registry, what: str, value: str) -> str:
    """``value`` if ``table`` has it; else the error the API and the CLI give for the name."""
    if value not in table:
        raise ValueError(f"unknown {what} {value!r}; accepted: {', '.join(table.names())}")
    return value


class _Strict(BaseModel):
    # strict: no coercion (``true`` → 1, ``1.0`` → 1, ``'yes'`` → True), as _checks refuses
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class PruneStage(_Strict):
    """One-shot pruning (:func:`sparsekit.prune`), or the target of a gradual schedule."""

    sparsity: float = Field(ge=0.0, lt=1.0)
    method: str = "magnitude"
    allocation: str = "uniform"
    pattern: str = "unstructured"
    exclude: list[str] = []

    @field_validator("method")
    @classmethod
    def _method(cls, value: str) -> str:
        _registered(CRITERIA, "method", value)
        if CRITERIA.meta(value)["data_driven"]:
            raise ValueError(f"method {value!r} needs calibration data, which recipes do not "
                             "take yet; accepted here: data-free methods such as 'magnitude'")
        return value

    @field_validator("allocation")
    @classmethod
    def _allocation(cls, value: str) -> str:
        return _registered(ALLOCATIONS, "allocation", value)

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, value: str) -> str:
        parse_pattern(value)  # its ValueError names the accepted patterns
        return value


class FinetuneStage(_Strict):
    """Training on the image dataset (Fashion-MNIST, else digits) with the masks held.

    ``schedule: oneshot`` prunes before training and keeps the masks; ``gradual`` ramps the
    sparsity from 0 to ``prune.sparsity`` over the first ``ramp`` of the steps (Zhu &
    Gupta), pruning ``every`` steps.
    """

    epochs: int = Field(default=1, ge=1, le=MAX_EPOCHS)
    lr: float = Field(default=1e-3, gt=0.0, le=10.0)
    batch_size: int = Field(default=128, ge=1)
    schedule: Literal["oneshot", "gradual"] = "oneshot"
    ramp: float = Field(default=0.75, gt=0.0, le=1.0)
    every: int = Field(default=10, ge=1)
    data_dir: str | None = None

    @field_validator("data_dir")
    @classmethod
    def _data_dir(cls, value: str | None) -> str | None:
        return _not_blank(value, "the directory of the dataset's IDX files")  # not "root '.'"


class CompileStage(_Strict):
    """:func:`sparsekit.compile` on an example batch of the model's input shape."""

    formats: str | list[str] = "auto"
    rows: list[int] | None = None
    weight_dtype: Literal["bf16", "int8"] | None = None

    @field_validator("formats")
    @classmethod
    def _formats(cls, value: str | list[str]) -> str | list[str]:
        check_formats(value)  # its ValueError names the accepted formats
        return value

    @field_validator("rows")
    @classmethod
    def _rows(cls, value: list[int] | None) -> list[int] | None:
        if value is not None:
            check_rows(value)  # row counts in [1, MAX_ROWS], as compile() takes them
        return value


class ReportStage(_Strict):
    markdown: bool = False


class Recipe(_Strict):
    """A validated recipe (see the module's notes)."""

    model: str
    checkpoint: str | None = None
    input_shape: list[int] = [1, 1, 28, 28]
    seed: int = Field(default=0, ge=0, le=MAX_SEED)  # as every seed= (check_seed)
    prune: PruneStage | None = None
    finetune: FinetuneStage | None = None
    compile: CompileStage | None = None
    report: ReportStage | None = ReportStage()
    out: str | None = None

    @field_validator("model")
    @classmethod
    def _model(cls, value: str) -> str:
        return _registered(MODELS, "model", value)

    @field_validator("checkpoint")
    @classmethod
    def _checkpoint(cls, value: str | None) -> str | None:
        return _not_blank(value, "the path of a checkpoint file")  # not "'.' is a directory"

    @field_validator("input_shape")
    @classmethod
    def _shape(cls, value: list[int]) -> list[int]:
        # each dimension first: one past 2**63 gave torch's bare "Overflow when unpacking"
        if not value or any(not 1 <= d <= 2**24 for d in value) \
                or torch.Size(value).numel() > 2**24:
            raise ValueError(f"must be dimensions ≥ 1 with at most 2**24 elements, got {value}")
        return value

    def model_post_init(self, _context: object) -> None:
        if self.finetune is not None and self.finetune.schedule == "gradual" and self.prune is None:
            raise ValueError("finetune.schedule 'gradual' needs a prune stage (its target)")

    @model_validator(mode="after")
    def _fits_model(self) -> Recipe:
        """Check the fields only the model can judge on a fresh copy of it, so that a
        recipe that validates does not fail halfway through its run; each error names
        its field."""
        # the run's own copy (seeded as run_recipe seeds it, on the CPU where it is built),
        # and the caller's random state as it was: loading a recipe drew the model's initial
        # weights from it
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(self.seed)
            model = create_model(self.model)
        if self.checkpoint is not None:
            with _field("checkpoint"):
                sparsekit.load(model, self.checkpoint)
        if self.prune is not None:
            with _field("prune.exclude"):
                chosen = resolve_targets(model, exclude=self.prune.exclude)
            with _field("prune.pattern"):
                check_pattern(parse_pattern(self.prune.pattern), chosen)
        with torch.no_grad(), model_errors("input_shape"):
            model.eval()(torch.zeros(self.input_shape))
        if self.compile is not None:
            with _field("compile.formats"):
                self._check_compilable(model)
        if self.finetune is not None and self.finetune.data_dir is not None:
            # a directory without the dataset failed only at the fine-tune stage, after the
            # prune stage had run (and `sparsekit run --check` called the recipe valid)
            with _field("finetune.data_dir"):
                check_image_root(self.finetune.data_dir)
        if self.out is not None:
            with _field("out"):
                _check_out(self.out, self.checkpoint)
        return self

    def _check_compilable(self, model: torch.nn.Module) -> None:
        """Raise ``ValueError`` when ``compile.formats`` are forced (no ``"dense"``) and
        none of them can hold the weight of any layer of ``model`` once pruned as the run
        prunes it: :func:`sparsekit.compile` refused that only after the prune and
        fine-tune stages had run, and ``sparsekit run --check`` called the recipe valid."""
        c = self.compile
        assert c is not None
        names = check_formats(c.formats)
        if names is None or "dense" in names:
            return  # every layer may stay dense: nothing the compile stage can refuse
        if self.prune is not None:
            p = self.prune
            with torch.random.fork_rng(devices=[]):
                sparsekit.prune(model, p.sparsity, method=p.method, allocation=p.allocation,
                                pattern=p.pattern, exclude=p.exclude, seed=self.seed)
        if not formats_fit(model, names, c.weight_dtype):
            raise ValueError(
                f"{names!r} cannot hold the weight of any layer of {self.model!r} "
                f"({f'pruned {self.prune.pattern}' if self.prune else 'not pruned by the recipe'}"
                f"{'' if c.weight_dtype is None else f', values {c.weight_dtype}'}); "
                "accepted: formats that fit them, 'auto', or a list including 'dense'")


def _check_out(out: str, checkpoint: str | None) -> None:
    """Raise ``ValueError`` unless ``out`` can be written as a checkpoint file
    (:func:`~sparsekit.checkpoint.checkpoint_file`) and is not the ``checkpoint`` the
    recipe starts from (also through a link or another spelling: the run replaced it, as
    ``sparsekit run`` never does). Checked when the recipe is loaded, as otherwise only the
    last stage found out, after every stage before it had run. The directory the file goes
    into (or its nearest existing folder, where the save creates the rest) must be
    writable: a read-only one failed only in that save."""
    try:
        target = _checkpoint.checkpoint_file(out)
    except ValueError as e:
        raise ValueError(f"cannot write {out!r}: {e}") from None
    except OSError as e:  # a name too long: was "[Errno 36] …" with the path once more
        raise ValueError(f"cannot write {out!r}: {e.strerror or e}") from None
    folder = write_target(target).absolute().parent
    while not folder.exists():
        folder = folder.parent
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write {out!r}: the directory {str(folder)!r} is not "
                         "writable; accepted: a path in a directory you can write")
    if checkpoint is not None and os.path.exists(checkpoint) and lands_on(out, checkpoint):
        raise ValueError(f"cannot write {out!r}: it is the input checkpoint {checkpoint!r} "
                         "the recipe starts from; write to another file")


@contextlib.contextmanager
def _field(name: str) -> Iterator[None]:
    """Prefix the ``ValueError`` (or ``OSError``: a missing checkpoint) raised inside with
    the recipe field ``name``, as pydantic names its own errors' fields."""
    try:
        yield
    except (ValueError, OSError) as err:
        raise ValueError(f"{name}: {err}") from err


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key repeated in one mapping (YAML keeps the last
    one silently, so ``seed: 1`` then ``seed: 2`` would run with 2) and reads every plain
    key as the name it spells."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                # ``<<: *defaults``, merged by SafeLoader (keys given beside it override):
                # constructing the key here was "not valid YAML (could not determine a
                # constructor for the tag …merge)"
                continue
            if isinstance(key_node, yaml.ScalarNode) and key_node.style is None:
                # a plain key is its text: YAML 1.1 read ``on:`` / ``yes:`` as True and
                # ``1:`` as 1, refused as "Keys should be strings, got True" (no "on" in it)
                key_node.tag = _STR
            key = self.construct_object(key_node, deep=deep)
            try:
                hash(key)
            except TypeError:  # ``? [a, b]``: was a raw TypeError from the set below
                raise yaml.constructor.ConstructorError(
                    None, None, f"a mapping key must be a name, got a {type(key).__name__}",
                    key_node.start_mark) from None
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)

    def resolve(self, kind: type, value: str, implicit: tuple[bool, bool]) -> str:
        """The tag of a plain scalar, except that YAML 1.1's base-60 and leading-zero octal
        numbers are strings, as in YAML 1.2 and JSON: ``pattern: 2:4`` was the int 124
        (refused as "Input should be a valid string, got 124") and ``seed: 010`` silently
        the int 8; now the pattern is ``'2:4'`` and ``'010'`` is refused as no integer."""
        tag = super().resolve(kind, value, implicit)
        if tag in (_INT, _FLOAT) and (":" in value or _OCTAL.match(value)):
            return _STR
        return tag


_INT, _FLOAT, _STR = (f"tag:yaml.org,2002:{t}" for t in ("int", "float", "str"))
_OCTAL = re.compile(r"^[-+]?0[0-7_]+$")  # YAML 1.1's octal ints (``0o17`` is no int there)


# YAML 1.1 (PyYAML) reads ``1e-3``, ``1e5`` and ``1.0e5`` as strings: ``lr: 1e-3`` was refused
# as "Input should be a valid number, got '1e-3'", and so was the JSON that
# ``Recipe.model_dump_json`` writes for a small ``lr``. They are floats, as YAML 1.2 and JSON
# read them.
_UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"),
)


_MAX_DEPTH = 32
"""The deepest nesting of mappings and lists a recipe file may hold (examples/recipe.yaml
needs 3)."""


def _children(item: object) -> list[object]:
    """The values a mapping or list holds, none for anything else."""
    if isinstance(item, dict):
        return list(item.values())
    return item if isinstance(item, list) else []


def _too_deep(data: object) -> bool:
    """Whether ``data`` (what YAML loaded) nests mappings and lists more than
    :data:`_MAX_DEPTH` levels deep, counted level by level without recursion. Each level
    holds each object once: YAML's aliases share objects (eight levels of nine aliases each
    are 43 million paths but nine lists), and a structure that holds itself (``&a [1, *a]``)
    never runs out of levels."""
    level = [data] if isinstance(data, (dict, list)) else []
    for _ in range(_MAX_DEPTH):
        inner = {id(c): c for item in level for c in _children(item) if isinstance(c, (dict, list))}
        if not inner:
            return False
        level = list(inner.values())
    return True


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Read and validate the YAML recipe at ``path``; ``ValueError`` lists every problem
    (the first 20), each as ``field.path: message``."""
    if not isinstance(path, (str, os.PathLike)):
        raise ArgumentTypeError(f"path must be the path of a YAML recipe file (a str or "
                                f"os.PathLike), got {type(path).__name__}")
    name = os.fspath(path)
    if not isinstance(name, str) or not name.strip() or "\0" in name:
        # "" was read as "." ("'.' is a directory"), a NUL a bare "embedded null byte"
        raise ValueError(f"path must be the path of a YAML recipe file, got {name!r}")
    try:
        text = _read_recipe_bytes(Path(path)).decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not a UTF-8 text file ({err.reason} at byte "
                         f"{err.start})") from None
    too_deep = (f"{path}: nested too deeply to be a recipe (more than {_MAX_DEPTH} levels; a "
                "recipe is a mapping of fields, a few levels deep; see examples/recipe.yaml)")
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML ({err})") from None
    except RecursionError:  # ``[[[…]]]`` some hundreds deep: PyYAML recurses per level
        raise ValueError(too_deep) from None
    if _too_deep(data):  # where PyYAML built it (its recursion depends on the stack)
        raise ValueError(too_deep)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a recipe is a mapping of fields, got {type(data).__name__}")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as err:
        problems = [_problem(e) for e in err.errors()[:_MAX_PROBLEMS]]
        if err.error_count() > _MAX_PROBLEMS:
            problems.append(f"… and {err.error_count() - _MAX_PROBLEMS} more")
        raise ValueError(f"{path}: {'; '.join(problems)}") from None
    if recipe.out is not None and os.path.exists(recipe.out) and os.path.samefile(recipe.out,
                                                                                   path):
        # run_recipe replaced the recipe file with the checkpoint (sparsekit run refuses it)
        raise ValueError(f"{path}: out: {recipe.out!r} is the input {os.fspath(path)!r}; "
                         "write to another file")
    return recipe


MAX_RECIPE_BYTES = 1 << 20
"""A recipe is a few lines of YAML; a larger file is refused before it is parsed."""


def _read_recipe_bytes(path: Path) -> bytes:
    """The bytes of the regular file ``path``, at most :data:`MAX_RECIPE_BYTES`: a FIFO
    (``/dev/stdin``) blocked ``read_text`` and ``/dev/zero`` filled the memory, a file of
    hundreds of megabytes took minutes to parse."""
    # O_NONBLOCK: opening a FIFO waits for a writer otherwise (no effect on a file)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        mode = os.fstat(fd).st_mode
    except BaseException:
        os.close(fd)
        raise
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = "is a directory" if stat.S_ISDIR(mode) else "is not a regular file"
        raise ValueError(f"{path} {kind}; a recipe is a YAML file")
    with os.fdopen(fd, "rb") as f:
        data = f.read(MAX_RECIPE_BYTES + 1)
    if len(data) > MAX_RECIPE_BYTES:
        raise ValueError(f"{path}: larger than {MAX_RECIPE_BYTES:,} bytes; a recipe is a few "
                         "lines of YAML (see examples/recipe.yaml)")
    return data


def _problem(error: ErrorDetails) -> str:
    """One pydantic error as ``field.path: message``, with the value it got; the messages
    of this module's own validators (and the library's, which they call) name it already,
    and those of :meth:`Recipe._fits_model` also their field."""
    where = ".".join(str(p) for p in error["loc"])
    if error["type"] == "value_error":
        message = str(error["ctx"]["error"])
    elif error["type"] == "missing":
        message = error["msg"]
    else:
        message = f"{error['msg']}, got {_short(error['input'])}"
    return f"{where}: {message}" if where else message


_REPR = reprlib.Repr()  # its keyword arguments are Python 3.12's
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxstring, _REPR.maxother = 2, 6, 6, 60, 60
_MAX_REPR = 200
_MAX_PROBLEMS = 20


def _short(value: object) -> str:
    """``repr(value)``, cut short: a YAML alias repeated inside aliases (``&b [*a, *a, …]``)
    makes a small file a value whose full repr is exponentially long, which took seconds
    and megabytes per error message (and more with every level)."""
    text = _REPR.repr(value)
    return text if len(text) <= _MAX_REPR else f"{text[:_MAX_REPR]}…"


def run_recipe(recipe: Recipe, *, log=print) -> dict[str, object]:  # type: ignore[no-untyped-def]
    """Run ``recipe``'s stages in order; return what they produced (``model``, ``masks``,
    ``compiled``, ``report``, ``accuracy``, ``out``)."""
    if not isinstance(recipe, Recipe):  # a path was a raw AttributeError ('str' … 'seed')
        raise ArgumentTypeError(f"recipe must be a Recipe (from load_recipe(path)), got "
                                f"{type(recipe).__name__}")
    if not callable(log):  # was a raw TypeError after the first stage had run
        raise ArgumentTypeError(f"log must be a callable taking a str (print), got "
                                f"{type(log).__name__}")
    # seeded in a fork: it reseeded the caller's generator, whose next numbers were then
    # the recipe's (load_recipe forks the same way)
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(recipe.seed)
        return _run(recipe, log)


def _run(recipe: Recipe, log):  # type: ignore[no-untyped-def]
    """:func:`run_recipe` once its arguments are checked and the generator seeded."""
    model = create_model(recipe.model)
    masks = sparsekit.load(model, recipe.checkpoint) if recipe.checkpoint else None
    example = torch.zeros(recipe.input_shape)
    result: dict[str, object] = {"model": model}
    gradual = recipe.finetune is not None and recipe.finetune.schedule == "gradual"
    if recipe.prune is not None and not gradual:
        p = recipe.prune
        masks = sparsekit.prune(model, p.sparsity, method=p.method, allocation=p.allocation,
                                pattern=p.pattern, exclude=p.exclude, seed=recipe.seed)
        log(f"pruned to {masks.sparsity():.2%} ({p.method}, {p.allocation}, {p.pattern})")
    if recipe.finetune is not None:
        masks, result["accuracy"] = _finetune(model, masks, recipe, log)
    result["masks"] = masks
    final = model.eval()
    if recipe.compile is not None:
        c = recipe.compile
        final = sparsekit.compile(model, example, formats=c.formats, rows=c.rows,
                                  weight_dtype=c.weight_dtype)
        result["compiled"] = final
    if recipe.report is not None:
        from sparsekit.engine import report as engine_report

        rep = (engine_report(final, example) if recipe.compile is not None
               else sparsekit.report(final, example, masks=masks))
        result["report"] = rep
        log(rep.to_markdown() if recipe.report.markdown else rep.to_text())
    if recipe.out is not None:  # last: a stage that fails leaves no output behind
        result["out"] = sparsekit.save(model, recipe.out, masks)
        log(f"wrote {recipe.out}")
    return result


def _finetune(model, masks, recipe: Recipe, log):  # type: ignore[no-untyped-def]
    from sparsekit.data import load_image_dataset
    from sparsekit.training import accuracy, train_epoch

    f = recipe.finetune
    assert f is not None
    data = load_image_dataset(f.data_dir)
    optimizer = torch.optim.Adam(model.parameters(), lr=f.lr)
    on_step = None
    if f.schedule == "gradual":
        p = recipe.prune
        assert p is not None
        steps = f.epochs * -(-len(data.train) // f.batch_size)
        pruner = sparsekit.GradualPruner(
            model, p.sparsity, start_step=0, end_step=max(1, int(f.ramp * steps)),
            every=f.every, method=p.method, allocation=p.allocation, pattern=p.pattern,
            exclude=p.exclude, optimizer=optimizer,
        )
        on_step = pruner.step
    elif masks is not None:
        masks.attach(optimizer)
    for epoch in range(f.epochs):
        loss = train_epoch(model, data.train, optimizer, batch_size=f.batch_size,
                           seed=(recipe.seed + epoch) & MAX_SEED, on_step=on_step)
        log(f"epoch {epoch + 1}/{f.epochs}: loss {loss:.4f}")
    if f.schedule == "gradual":
        masks = pruner.masks
    acc = accuracy(model, data.test)
    log(f"test accuracy {acc:.2%} on {data.name}")
    return masks, acc
