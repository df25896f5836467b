"""Which ``nn.Linear`` layers get their inputs thresholded.

By default every ``nn.Linear`` except the output and task heads: a module named ``lm_head``,
the model's ``get_output_embeddings()`` and, in a Hugging Face model with a task head
(``BertForSequenceClassification``'s ``classifier``, ``BertForMaskedLM``'s
``cls.predictions``), every module outside its base model (``base_model_prefix``). Their
input is the final hidden state, which every logit depends on; found by the name
``lm_head`` alone, BERT's heads had 51-55 % of their inputs zeroed. ``cats`` thresholds only the
input of a gated MLP's down projection, ``act(gate(x)) * up(x)``; those layers are found by
name, as the ``nn.Linear`` modules whose name ends in ``down_proj`` (LLaMA, Mistral, Qwen,
Gemma and most Hugging Face decoders).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from sparsekit._checks import check_not_compiled
from sparsekit.targets import TargetSpec, conv1d_type, resolve_targets

__all__ = ["find_layers"]

_HEAD = "lm_head"
_DOWN_PROJ = "down_proj"


def find_layers(
    model: nn.Module, method: str, targets: TargetSpec | Sequence[TargetSpec] | None = None
) -> dict[str, nn.Linear]:
    """The targeted ``nn.Linear`` modules of ``model`` by name, in definition order.

    ``targets`` (module types, names or globs, as in :func:`sparsekit.resolve_targets`)
    replaces the default selection of ``method``; every module it names must be an
    ``nn.Linear``.
    """
    if targets is not None:
        chosen = {t.module_name for t in resolve_targets(model, targets)}
        layers = {n: m for n, m in model.named_modules() if n in chosen}
        other = {n: type(m).__name__ for n, m in layers.items() if not isinstance(m, nn.Linear)}
        if other:  # left out without a word: calibrated and applied dense
            raise ValueError(
                f"targets: {other} are not nn.Linear layers, whose inputs activation "
                "sparsity thresholds (one threshold per input feature of a weight's "
                "columns); accepted: targets that name nn.Linear modules only")
    else:
        heads = _heads(model)
        layers = {n: m for n, m in model.named_modules()
                  if _default(n, method) and not any(n == h or n.startswith(h + ".")
                                                      for h in heads)}
    layers = {n: m for n, m in layers.items() if isinstance(m, nn.Linear)}
    if not layers:
        check_not_compiled("model", model, "calibrating activation sparsity")
        wanted = (
            f"nn.Linear modules named '*{_DOWN_PROJ}' (the input of a gated MLP's down "
            "projection)" if method == "cats" and targets is None
            else f"nn.Linear modules among targets={targets!r}"
        )
        conv1d = conv1d_type()
        held = "" if conv1d is None or not any(isinstance(m, conv1d) for m in model.modules()) \
            else " (its GPT-2 Conv1D layers are no nn.Linear, the layers it takes)"
        raise ValueError(f"targets: the model has no {wanted} for method={method!r}{held}")
    return layers


def _default(name: str, method: str) -> bool:
    last = name.rsplit(".", 1)[-1]
    return last == _DOWN_PROJ if method == "cats" else last != _HEAD


def _heads(model: nn.Module) -> set[str]:
    """Names of the modules that compute the model's outputs from its final hidden state:
    its output embeddings and, in a Hugging Face model wrapping a base model, every child
    outside that base model."""
    heads = set()
    output = getattr(model, "get_output_embeddings", None)
    output = output() if callable(output) else None
    prefix = getattr(model, "base_model_prefix", None)
    base = getattr(model, prefix, None) if isinstance(prefix, str) and prefix else None
    for name, module in model.named_modules():
        if module is output and name:
            heads.add(name)
    if isinstance(base, nn.Module):
        heads.update(name for name, child in model.named_children() if child is not base)
    return heads

