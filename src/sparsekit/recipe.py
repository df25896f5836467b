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
names the field (``prune.sparsity: …``) and unknown fields are refused, so a typo is not
silently ignored. :func:`run_recipe` runs it (``sparsekit run recipe.yaml``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

import sparsekit
from sparsekit.allocation import ALLOCATIONS
from sparsekit.models import MODELS, create_model
from sparsekit.patterns import parse_pattern
from sparsekit.registry import Registry
from sparsekit.scores import CRITERIA

__all__ = ["Recipe", "load_recipe", "run_recipe"]


def _registered(table: Registry, what: str, value: str) -> str:
    """``value`` if ``table`` has it; else the error the API and the CLI give for the name."""
    if value not in table:
        raise ValueError(f"unknown {what} {value!r}; accepted: {', '.join(table.names())}")
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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

    epochs: int = Field(default=1, ge=1, le=1000)
    lr: float = Field(default=1e-3, gt=0.0, le=10.0)
    batch_size: int = Field(default=128, ge=1)
    schedule: Literal["oneshot", "gradual"] = "oneshot"
    ramp: float = Field(default=0.75, gt=0.0, le=1.0)
    every: int = Field(default=10, ge=1)
    data_dir: str | None = None


class CompileStage(_Strict):
    """:func:`sparsekit.compile` on an example batch of the model's input shape."""

    formats: str | list[str] = "auto"
    rows: list[int] | None = None
    weight_dtype: Literal["bf16", "int8"] | None = None

    @field_validator("rows")
    @classmethod
    def _rows(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and (not value or any(r < 1 for r in value)):
            raise ValueError(f"must be a non-empty list of row counts ≥ 1, got {value}")
        return value


class ReportStage(_Strict):
    markdown: bool = False


class Recipe(_Strict):
    """A validated recipe (see the module's notes)."""

    model: str
    checkpoint: str | None = None
    input_shape: list[int] = [1, 1, 28, 28]
    seed: int = 0
    prune: PruneStage | None = None
    finetune: FinetuneStage | None = None
    compile: CompileStage | None = None
    report: ReportStage | None = ReportStage()
    out: str | None = None

    @field_validator("model")
    @classmethod
    def _model(cls, value: str) -> str:
        return _registered(MODELS, "model", value)

    @field_validator("input_shape")
    @classmethod
    def _shape(cls, value: list[int]) -> list[int]:
        if not value or any(d < 1 for d in value) or torch.Size(value).numel() > 2**24:
            raise ValueError(f"must be dimensions ≥ 1 with at most 2**24 elements, got {value}")
        return value

    def model_post_init(self, _context: object) -> None:
        if self.finetune is not None and self.finetune.schedule == "gradual" and self.prune is None:
            raise ValueError("finetune.schedule 'gradual' needs a prune stage (its target)")


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Read and validate the YAML recipe at ``path``; ``ValueError`` lists every problem,
    each as ``field.path: message``."""
    import yaml

    text = Path(path).read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a recipe is a mapping of fields, got {type(data).__name__}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'recipe'}: {e['msg']}" for e in err.errors()
        )
        raise ValueError(f"{path}: {problems}") from None


def run_recipe(recipe: Recipe, *, log=print) -> dict[str, object]:  # type: ignore[no-untyped-def]
    """Run ``recipe``'s stages in order; return what they produced (``model``, ``masks``,
    ``compiled``, ``report``, ``accuracy``, ``out``)."""
    torch.manual_seed(recipe.seed)
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
    if recipe.out is not None:
        result["out"] = sparsekit.save(model, recipe.out, masks)
        log(f"wrote {recipe.out}")
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
        log(rep.to_markdown() if recipe.report.markdown else str(rep))
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
            optimizer=optimizer,
        )
        on_step = pruner.step
    elif masks is not None:
        masks.attach(optimizer)
    for epoch in range(f.epochs):
        loss = train_epoch(model, data.train, optimizer, batch_size=f.batch_size,
                           seed=recipe.seed + epoch, on_step=on_step)
        log(f"epoch {epoch + 1}/{f.epochs}: loss {loss:.4f}")
    if f.schedule == "gradual":
        masks = pruner.masks
    acc = accuracy(model, data.test)
    log(f"test accuracy {acc:.2%} on {data.name}")
    return masks, acc
