"""Dependency groups of Hugging Face transformer blocks: FFN neurons and attention heads.

``torch.fx`` cannot follow a transformer's attention (its heads live in reshapes), so the
groups are read from the block's known layout instead: an FFN neuron is a row of
``gate_proj``/``up_proj`` (BERT: ``intermediate.dense``) and a column of ``down_proj``
(``output.dense``); an attention unit is a key/value head with the query heads that read
it (grouped-query attention; one head without it): rows of q/k/v, columns of o. They are
:class:`~sparsekit.structured.Group` s like any CNN channel, so the same importance,
masks and :func:`~sparsekit.structured.shrink.remove_channels` apply.
"""

from __future__ import annotations

import numbers

from torch import nn

from sparsekit.blocks import find_blocks
from sparsekit.structured.dependency import Group, Slice

__all__ = ["UNITS", "block_group", "transformer_blocks", "transformer_groups"]

UNITS = ("ffn", "heads")

# (writers, reader) of a block's feed-forward network: LLaMA/Mistral/Qwen2, BERT
_FFNS = ((("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj"),
         (("intermediate.dense",), "output.dense"))
# (q, k, v, o, module holding the head size, its attribute): LLaMA/Mistral/Qwen2, BERT
_ATTENTIONS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "self_attn", "head_dim"),
               ("attention.self.query", "attention.self.key", "attention.self.value",
                "attention.output.dense", "attention.self", "attention_head_size"))

# layouts that block_group names when it refuses a block: (a submodule's path, what it is)
_UNSUPPORTED = (("mlp.experts", "mixture-of-experts FFNs"),
                ("block_sparse_moe", "mixture-of-experts FFNs"),
                ("mlp.gate_up_proj", "fused gate/up projections"),
                ("self_attn.qkv_proj", "fused q/k/v projections"))


def transformer_groups(model: nn.Module, unit: str) -> list[Group]:
    """One group per transformer block: its FFN neurons (``unit="ffn"``) or attention
    heads (``unit="heads"``); ``ValueError`` for a block without that unit."""
    _check_unit(unit)
    prefix, blocks = transformer_blocks(model)
    groups = [block_group(f"{prefix}.{i}", b, unit) for i, b in enumerate(blocks)]
    _check_unshared(model, groups)
    return groups


def _check_unshared(model: nn.Module, groups: list[Group]) -> None:
    """``ValueError`` when two blocks' groups hold one tensor (a layer, or a whole block,
    shared between blocks): each block chooses its own units, and the shared tensor lost
    the units of both — a ``gate_proj`` shared by two blocks was cut to fewer rows than
    either block's ``up_proj``, a model that no longer ran."""
    owner: dict[int, tuple[str, str]] = {}
    for group in groups:
        for s in group.slices:
            tensor = model.get_parameter(s.name)
            first = owner.setdefault(id(tensor), (group.name, s.name))
            if first[0] != group.name:
                raise ValueError(
                    f"{s.name!r} is the tensor {first[1]!r} of another block: a layer shared "
                    f"by several blocks cannot lose each block's own units; accepted: blocks "
                    f"with layers of their own (untie them first, e.g. with copy.deepcopy)")


def transformer_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The qualified name and the list of ``model``'s transformer blocks."""
    blocks = find_blocks(model)
    prefix = next(n for n, m in model.named_modules() if m is blocks)
    return prefix, blocks


def block_group(name: str, block: nn.Module, unit: str) -> Group:
    """The FFN neurons or attention heads of one block as a dependency group."""
    _check_unit(unit)  # anything else was taken for "heads", silently

    def has(path: str) -> bool:
        try:
            block.get_submodule(path)
        except AttributeError:
            return False
        return True

    def linear(path: str) -> nn.Module:
        """The layer at ``path``; ``ValueError`` naming it unless it is linear (an
        ``nn.Identity`` in its place has no rows or columns to group)."""
        layer = block.get_submodule(path)
        if not all(hasattr(layer, a) for a in ("weight", "in_features", "out_features")):
            raise ValueError(f"unit {unit!r}: {name}.{path} must be an nn.Linear, got "
                             f"{type(layer).__name__}")
        return layer

    def slices(path: str, dim: int, role: str, repeat: int) -> list[Slice]:
        layer = linear(path)
        out = [Slice(f"{name}.{path}.weight", dim, role, 0, repeat)]
        if dim == 0 and layer.bias is not None:
            out.append(Slice(f"{name}.{path}.bias", 0, role, 0, repeat))
        return out

    if unit == "ffn":
        for writers, reader in _FFNS:
            if all(has(p) for p in (*writers, reader)):
                width = linear(reader).in_features
                rows = {w: linear(w).out_features for w in writers}
                if any(n != width for n in rows.values()):  # a neuron is a row of each
                    raise ValueError(
                        f"unit {unit!r}: the feed-forward network of block {name!r} has no "
                        f"whole neurons to group: {reader} reads {width} inputs but "
                        f"{', '.join(f'{w} writes {n}' for w, n in rows.items())}; accepted: "
                        "as many rows in every writer as the reader has columns")
                parts = [s for w in writers for s in slices(w, 0, "out", 1)]
                return Group(f"{name}.ffn", width, (*parts, *slices(reader, 1, "in", 1)))
    else:
        for q, k, v, o, holder, attr in _ATTENTIONS:
            if all(has(p) for p in (q, k, v, o)):
                size = getattr(block.get_submodule(holder), attr, None)
                rows = (linear(q).out_features, linear(k).out_features,
                        linear(v).out_features, linear(o).in_features)
                if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1 \
                        or rows[1] % size or rows[1] != rows[2] or rows[0] != rows[3] \
                        or rows[0] % rows[1] or not rows[1]:
                    # a head count that does not divide would group rows that are not heads
                    raise ValueError(
                        f"unit {unit!r}: the attention of block {name!r} has no whole heads "
                        f"to group: {holder}.{attr}={size!r}, q rows {rows[0]}, k rows "
                        f"{rows[1]}, v rows {rows[2]}, o columns {rows[3]}; accepted: k and "
                        f"v rows a multiple of the head size, as many o columns as q rows, "
                        f"and query heads a multiple of the key/value heads")
                size = int(size)  # a NumPy int from a config: plain ints in the group
                _check_no_head_state(name, block.get_submodule(holder), holder,
                                     {p.rpartition(".")[2] for p in (q, k, v, o)}, size)
                kv = rows[1] // size
                per_kv = rows[0] // kv  # query rows per kv head
                parts = [*slices(q, 0, "out", per_kv), *slices(k, 0, "out", size),
                         *slices(v, 0, "out", size), *slices(o, 1, "in", per_kv)]
                return Group(f"{name}.heads", kv, tuple(parts))
    layout = next((f" (its {what} are not supported)" for path, what in _UNSUPPORTED
                   if has(path)), "")
    raise ValueError(
        f"unit {unit!r}: block {name!r} ({type(block).__name__}) has no "
        f"{'feed-forward network' if unit == 'ffn' else 'attention'} this knows{layout}; accepted: "
        "LLaMA/Mistral/Qwen2-style (mlp.gate_proj/up_proj/down_proj, self_attn.q/k/v/o_proj) "
        "and BERT-style blocks (intermediate/output.dense, attention.self.query/key/value)"
    )


def _check_no_head_state(name: str, attention: nn.Module, holder: str, projections: set[str],
                         head_dim: int) -> None:
    """``ValueError`` when the attention module holds parameters beside q/k/v/o that
    removing heads would have to cut too: OLMo-2's q/k norms over the whole projection,
    Cohere's of shape (heads, head_dim), StableLM's one norm per head. Parameters of shape
    ``(head_dim,)`` that every head shares (Qwen3's and Gemma 3's q/k norms) stay."""
    for pname, param in attention.named_parameters():
        path = pname.split(".")
        if path[0] in projections:
            continue
        if tuple(param.shape) != (head_dim,) or any(part.isdigit() for part in path):
            raise ValueError(
                f"unit 'heads': the attention of block {name!r} holds {holder}.{pname} of "
                f"shape {tuple(param.shape)} beside its q/k/v/o projections, which removing "
                f"heads would have to cut too; accepted: attention whose other parameters "
                f"are shared by every head (shape ({head_dim},), e.g. Qwen3's q_norm); the "
                "model was not changed")


def _check_unit(unit: str) -> None:
    """``ValueError`` unless ``unit`` is one of :data:`UNITS`."""
    if unit not in UNITS:
        raise ValueError(f"unknown unit {unit!r}; accepted: {', '.join(map(repr, UNITS))}")
