"""Hostile inputs, round 18: the ecosystem integrations (accelerate), sparse fine-tuning
(LoRA, masked deltas), the distributed helpers and compressed checkpoints.

- ``merge`` of a ``peft`` model whose ``modules_to_save`` copies a module with a sparse
  weight (a plain ``get_peft_model``, which ``sparse_lora`` refuses) replaced that module
  with its densely trained copy: every pruned weight of it was filled in, silently, though
  ``merge`` promises that every weight zero before is zero after;
- ``sparse_lora`` without a ``MaskSet`` and a ``peft`` initialization that rewrites the base
  weight (``init_lora_weights="pissa"``, ``"olora"`` …) read the masks from the weights
  after ``peft`` had made them dense: the base lost its zeros, and ``merge`` gave a dense
  model, silently;
- ``merge(model, masks)`` of a ``peft`` model whose adapters ``peft``'s own
  ``merge_adapter()`` had merged (plain, dense) unloaded that dense merge as it was: the
  pruned weights the masks name came back filled in, silently;
- ``merge`` of an adapter holding NaN or infinite entries (a diverged training) wrote them
  into every kept weight of its layer, silently;
- a ``sparse_lora`` that was refused (a sparse ``Embedding`` base, a ``modules_to_save``
  copy of a sparse module) left ``peft``'s ``peft_config`` on the model, and the next
  ``sparse_lora`` of it warned of "multiple adapters in the same model";
- ``sparse_lora`` and ``merge`` of a model on the meta device failed with a raw
  ``RuntimeError`` ("Tensor.item() cannot be called on meta tensors"), and ``layer_masks``
  of what is no module with a raw ``AttributeError``;
- ``Delta`` of sparse (COO or CSR) value tensors failed inside PyTorch with a raw
  ``NotImplementedError`` ("Could not run 'aten::ne.Scalar' … 'SparseCPU'");
- ``Delta.apply`` onto a model built under ``torch.inference_mode`` (outside it) changed the
  first weight, then failed with a raw ``RuntimeError`` ("Inplace update to inference
  tensor outside InferenceMode");
- ``masked_delta`` (``DeltaTraining``) of a model built under ``torch.inference_mode`` failed
  in ``register_parametrization`` with a raw ``RuntimeError``, every parameter's
  ``requires_grad`` left off;
- ``Delta.apply`` onto a model sharded by FSDP2 failed with a raw ``RuntimeError`` ("got
  mixed torch.Tensor and DTensor");
- ``sparsekit.save`` and ``sparsekit.load`` of a model sharded by FSDP2 (``fully_shard``,
  ``DTensor`` parameters) failed with a raw ``RuntimeError`` ("Attempted to access the data
  pointer on an invalid python storage");
- ``sparsekit.save`` of a model with a uint16/uint32/uint64 or float8 buffer (or a 1-D
  parameter of those dtypes), all of which the format stores, failed with a raw
  ``NotImplementedError`` ("nonzero_count_cpu" not implemented), and so did ``read``/``load``
  of a plain safetensors file holding one;
- ``save``/``load``/``read``/``read_metadata`` with a ``path`` that is no path (``None``, an
  int, bytes) raised pathlib's ``TypeError``, which named no argument;
- ``sparsekit.save`` of a model on the meta device failed with a raw
  ``NotImplementedError`` ("Cannot copy out of meta tensor; no data!"), where ``load``
  names the tensors;
- ``sparsekit.save`` and ``sparsekit.load`` of a model whose ``state_dict`` holds an entry
  that is no tensor (the dict a module's ``get_extra_state`` returns) failed with a raw
  ``AttributeError``;
- ``sparsekit.save`` of a model with a sparse (COO or CSR) tensor in its ``state_dict`` (a
  registered buffer) failed with a raw ``NotImplementedError`` ("Cannot access storage of
  SparseTensorImpl");
- ``sparsekit.save(metadata={"model": …})`` of a :mod:`sparsekit.models` model replaced,
  silently, the header entry recording how to rebuild it (the CLI then could not);
- ``sparsekit.save`` to the path of an existing FIFO, device or socket (or a link to one)
  replaced it with a regular file (``/dev/null`` too, when run as root);
- ``sparsekit.save`` to a path through a broken symbolic link (to nothing, or a loop)
  failed creating the folders with a raw ``FileExistsError`` ("File exists");
- ``sparsekit.load`` into a model built under ``torch.inference_mode`` (outside it) copied
  every tensor in, then failed with a raw ``RuntimeError`` per tensor and returned no masks;
- a checkpoint whose header entry has an ``encoding`` or ``dtype`` that is a JSON list or
  object (a tampered file, sealed or not) failed with a raw ``TypeError`` ("unhashable
  type") before its seal was checked;
- ``integrations.accelerate.attach`` with a ``model`` that is no module (``None``, a str)
  failed in ``accelerator.unwrap_model`` with a raw ``AttributeError``, and with the
  ``Accelerator`` class in place of an instance with a raw ``TypeError``.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator

import pytest
import torch
from _state import snapshot, unchanged
from torch import nn

import sparsekit
from sparsekit import checkpoint
from sparsekit._checks import ArgumentTypeError
from sparsekit.finetune import Delta


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))


def _hooks(optimizer: torch.optim.Optimizer) -> tuple[int, int]:
    return len(optimizer._optimizer_step_pre_hooks), len(optimizer._optimizer_step_post_hooks)


# -- LoRA -----------------------------------------------------------------------------------


def test_merge_refuses_a_saved_copy_of_a_sparse_module():
    peft = pytest.importorskip("peft")
    from sparsekit.finetune import merge_lora

    model = mlp()
    masks = sparsekit.prune(model, 0.5)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["0"],
                                                         modules_to_save=["2"]))
    copy = next(m for m in wrapped.modules() if isinstance(m, peft.utils.ModulesToSaveWrapper))
    with torch.no_grad():  # the copy trained densely
        copy.modules_to_save["default"].weight.add_(1.0)
    before = snapshot(wrapped)
    with pytest.raises(ValueError, match=r"model: its modules_to_save: .*'base_model\.model\.2'"
                                         r" has a sparse weight"):
        merge_lora(wrapped, masks)
    assert unchanged(wrapped, before) and isinstance(model[2], peft.utils.ModulesToSaveWrapper)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_sparse_lora_without_masks_keeps_the_zeros_an_init_fills_in(init):
    peft = pytest.importorskip("peft")
    from sparsekit.finetune import merge_lora, sparse_lora

    model = mlp()
    kept = {n: m.clone() for n, m in sparsekit.prune(model, 0.5).masks.items()}
    x = torch.randn(5, 8)
    expected = model(x).detach()
    wrapped = sparse_lora(model, peft.LoraConfig(r=2, target_modules=["0", "2"],
                                                 init_lora_weights=init))
    assert torch.allclose(wrapped(x), expected, atol=1e-5)  # the model it was, at the start
    optimizer = torch.optim.SGD([p for p in wrapped.parameters() if p.requires_grad], lr=0.1)
    wrapped(x).sum().backward()
    optimizer.step()
    params = dict(merge_lora(wrapped).named_parameters())
    for n, m in kept.items():
        assert bool((params[n][~m] == 0).all()), n


def test_merge_refuses_an_adapter_with_non_finite_entries():
    peft = pytest.importorskip("peft")
    from sparsekit.finetune import merge_lora, sparse_lora

    model = mlp()
    masks = sparsekit.prune(model, 0.5)
    wrapped = sparse_lora(model, peft.LoraConfig(r=2, target_modules=["0", "2"]), masks)
    with torch.no_grad():
        wrapped.base_model.model[2].lora_B["default"].weight[0, 0] = float("nan")
    before = snapshot(wrapped)
    with pytest.raises(ValueError, match=r"^model: LoRA layer 'base_model\.model\.2' holds NaN "
                                         r"or infinite entries in 'lora_B\.default\.weight'"):
        merge_lora(wrapped)
    assert unchanged(wrapped, before) and len(sparsekit.finetune.lora.layer_masks(wrapped)) == 2


def test_merge_refuses_adapters_peft_merged_densely_before():
    peft = pytest.importorskip("peft")
    from sparsekit.finetune import merge_lora

    model = mlp()
    masks = sparsekit.prune(model, 0.5)
    kept = {n: m.clone() for n, m in masks.masks.items()}
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["0", "2"],
                                                         init_lora_weights=False))
    wrapped.merge_adapter()  # peft's own, plain: the pruned weights filled in
    before = snapshot(wrapped)
    with pytest.raises(ValueError, match=r"^LoRA layer 'base_model\.model\.0': adapter 'default' "
                                         r"was merged already by peft's plain merge"):
        merge_lora(wrapped, masks)
    assert unchanged(wrapped, before)
    wrapped.unmerge_adapter()
    params = dict(merge_lora(wrapped, masks).named_parameters())
    assert all(bool((params[n][~m] == 0).all()) for n, m in kept.items())


def test_a_refused_sparse_lora_leaves_no_peft_config_on_the_model():
    peft = pytest.importorskip("peft")
    from sparsekit.finetune import sparse_lora

    model = nn.Sequential(*mlp(), nn.Embedding(4, 8))
    masks = sparsekit.prune(model, 0.5, targets=["0.weight", "2.weight", "3.weight"])
    before, attributes = snapshot(model), set(vars(model))
    with pytest.raises(ArgumentTypeError, match=r"LoRA layer 'base_model\.model\.3' \(Embedding\) "
                                                r"has a sparse base weight"):
        sparse_lora(model, peft.LoraConfig(r=2, target_modules=["0", "3"]), masks)
    assert unchanged(model, before) and set(vars(model)) == attributes
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "Already found a `peft_config` attribute in the model"
        sparse_lora(model, peft.LoraConfig(r=2, target_modules=["0"]), masks)


def test_sparse_lora_and_merge_name_a_model_on_the_meta_device():
    peft = pytest.importorskip("peft")
    from sparsekit.finetune import merge_lora, sparse_lora
    from sparsekit.finetune.lora import layer_masks

    with torch.device("meta"):
        model = mlp()
    modules = dict(model.named_modules())
    config = peft.LoraConfig(r=2, target_modules=["0"])
    with pytest.raises(ValueError, match=r"^model: 0\.weight is on the meta device"):
        sparse_lora(model, config)
    assert dict(model.named_modules()) == modules
    wrapped = peft.get_peft_model(mlp(), config).to("meta")
    with pytest.raises(ValueError, match=r"^model: .*0\.base_layer\.weight is on the meta"):
        merge_lora(wrapped)
    with pytest.raises(ArgumentTypeError, match=r"^model must be an nn\.Module, got str$"):
        layer_masks("model")


# -- masked deltas --------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["coo", "csr"])
def test_delta_refuses_sparse_values(layout):
    values = torch.eye(4)
    values = values.to_sparse() if layout == "coo" else values.to_sparse_csr()
    with pytest.raises(ArgumentTypeError, match=r"^values\['w'\] must be a dense \(strided\) "
                                                r"tensor, got layout torch\.sparse_"):
        Delta({"w": values}, {"w": torch.ones(4, 4, dtype=torch.bool)})


def _inference_model() -> nn.Module:
    with torch.inference_mode():
        return mlp()


def test_delta_apply_refuses_inference_tensors_outside_inference_mode():
    model = _inference_model()
    ones = {n: torch.ones(model.get_parameter(n).shape) for n in ("0.weight", "2.weight")}
    delta = Delta(ones, {n: torch.ones(v.shape, dtype=torch.bool) for n, v in ones.items()})
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"^model: parameter '0\.weight' is an inference tensor"):
        delta.apply(model)
    assert unchanged(model, before)
    with torch.inference_mode():
        delta.apply(model)
    assert torch.equal(model[2].weight, before["2.weight"] + 1)


def test_masked_delta_refuses_inference_tensors_outside_inference_mode():
    from sparsekit.finetune import masked_delta

    model = _inference_model()
    before, flags = snapshot(model), [p.requires_grad for p in model.parameters()]
    with pytest.raises(ValueError, match=r"^model: parameter '0\.weight' is an inference tensor "
                                         r".*which cannot take a delta"):
        masked_delta(model, 0.5, method="magnitude")
    assert unchanged(model, before) and [p.requires_grad for p in model.parameters()] == flags


@pytest.fixture
def sharded() -> Iterator[nn.Module]:
    """``mlp()`` through FSDP2's ``fully_shard`` in a one-process gloo group."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    if dist.is_initialized():
        pytest.skip("a process group is running already")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = mlp()
        fully_shard(model)
        yield model
    finally:
        dist.destroy_process_group()


def _whole(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.full_tensor().clone() for k, v in model.state_dict().items()}


def test_delta_apply_refuses_a_sharded_model(sharded):
    delta = Delta({"0.weight": torch.ones(8, 8)}, {"0.weight": torch.ones(8, 8, dtype=torch.bool)})
    before = _whole(sharded)
    with pytest.raises(ValueError, match=r"^model is sharded \(its parameters are DTensor shards"
                                         r".*apply the delta before sharding it$"):
        delta.apply(sharded)
    after = _whole(sharded)
    assert all(torch.equal(after[k], v) for k, v in before.items())


# -- checkpoints ----------------------------------------------------------------------------


def test_save_and_load_refuse_a_sharded_model(tmp_path, sharded):
    path = tmp_path / "model.safetensors"
    checkpoint.save(mlp(), path)
    saved = path.read_bytes()
    before = _whole(sharded)
    for call in (lambda: checkpoint.save(sharded, path), lambda: checkpoint.load(sharded, path)):
        with pytest.raises(ValueError, match=r"^model is sharded \(its parameters are DTensor "
                                             r"shards"):
            call()
    after = _whole(sharded)
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert path.read_bytes() == saved


@pytest.mark.parametrize("dtype", [torch.uint16, torch.uint32, torch.uint64,
                                   torch.float8_e4m3fn, torch.float8_e5m2])
def test_unsigned_and_float8_tensors_save_and_load_bit_identical(tmp_path, dtype):
    from safetensors.torch import save_file

    def build(values: list[float]) -> nn.Module:
        model = mlp()
        model.register_buffer("codes", torch.tensor(values).reshape(2, 2).to(dtype))
        model.scale = nn.Parameter(torch.tensor(values[:3]).to(dtype), requires_grad=False)
        return model

    model = build([1.0, 0.0, 3.0, 4.0])
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    checkpoint.save(model, first)
    other = build([2.0, 2.0, 2.0, 2.0])
    checkpoint.load(other, first)
    for key, value in model.state_dict().items():
        assert torch.equal(other.state_dict()[key].view(torch.uint8), value.view(torch.uint8))
    checkpoint.save(other, second)
    assert first.read_bytes() == second.read_bytes()
    plain = tmp_path / "plain.safetensors"
    save_file({"codes": model.codes}, str(plain))
    info = checkpoint.read_header(plain)[1]["codes"]
    assert info.nnz == 3 and torch.equal(checkpoint.read(plain).state["codes"].view(torch.uint8),
                                         model.codes.view(torch.uint8))


@pytest.mark.parametrize("path", [None, 3, b"model.safetensors"], ids=["None", "int", "bytes"])
@pytest.mark.parametrize("call", ["save", "load", "read", "read_metadata"])
def test_a_path_that_is_no_path_is_named(call, path):
    model = mlp()
    before = snapshot(model)
    calls = {"save": lambda: checkpoint.save(model, path),
             "load": lambda: checkpoint.load(model, path),
             "read": lambda: checkpoint.read(path),
             "read_metadata": lambda: checkpoint.read_metadata(path)}
    with pytest.raises(ArgumentTypeError, match=r"^path must be a str or os\.PathLike path of "
                                                r"a checkpoint file, got "):
        calls[call]()
    assert unchanged(model, before)


def test_save_names_a_model_on_the_meta_device(tmp_path):
    with torch.device("meta"):
        model = mlp()
    path = tmp_path / "model.safetensors"
    with pytest.raises(ValueError, match=r"^model has tensors on the meta device \(\['0\.weight'"
                                         r".*so there is nothing to save"):
        checkpoint.save(model, path)
    assert not path.exists() and not os.listdir(tmp_path)


class _Versioned(nn.Linear):
    """A layer with extra state that is no tensor (as ``get_extra_state`` may return)."""

    def get_extra_state(self) -> dict[str, int]:
        return {"version": 2}

    def set_extra_state(self, state: dict[str, int]) -> None:
        self.version = state["version"]


def test_save_and_load_name_a_state_dict_entry_that_is_no_tensor(tmp_path):
    path = tmp_path / "model.safetensors"
    checkpoint.save(nn.Linear(4, 4), path)
    saved = path.read_bytes()
    model = _Versioned(4, 4)
    weight, bias = model.weight.detach().clone(), model.bias.detach().clone()
    for call in (lambda: checkpoint.save(model, path), lambda: checkpoint.load(model, path)):
        with pytest.raises(ValueError, match=r"^model: its state_dict entries \['_extra_state'\] "
                                             r"are no tensors \(a dict, from a module's "
                                             r"get_extra_state\(\)\)"):
            call()
    assert torch.equal(model.weight, weight) and torch.equal(model.bias, bias)
    assert path.read_bytes() == saved


@pytest.mark.parametrize("layout", ["coo", "csr"])
def test_save_and_load_name_a_sparse_tensor_in_the_state_dict(tmp_path, layout):
    path = tmp_path / "model.safetensors"
    checkpoint.save(mlp(), path)
    saved = path.read_bytes()
    model = mlp()
    adjacency = torch.eye(3)
    model.register_buffer("adjacency", adjacency.to_sparse() if layout == "coo"
                          else adjacency.to_sparse_csr())
    before = {k: v.clone() for k, v in model.state_dict().items() if k != "adjacency"}
    for call in (lambda: checkpoint.save(model, path), lambda: checkpoint.load(model, path)):
        with pytest.raises(ValueError, match=rf"^model: its state_dict entries \['adjacency'\] are "
                                             rf"torch\.sparse_{layout} tensors; accepted: dense"):
            call()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert path.read_bytes() == saved


def test_save_refuses_metadata_that_replaces_the_recorded_model(tmp_path):
    from sparsekit.models import create_model

    model = create_model("lenet5")
    path = tmp_path / "model.safetensors"
    checkpoint.save(model, path)
    saved = path.read_bytes()
    with pytest.raises(ValueError, match=r"^metadata: keys \['model'\] are the checkpoint's own "
                                         r"header entries"):
        checkpoint.save(model, path, metadata={"model": "mine"})
    assert path.read_bytes() == saved
    other = tmp_path / "plain.safetensors"  # a model that records nothing leaves "model" free
    checkpoint.save(mlp(), other, metadata={"model": "mine"})
    assert checkpoint.read_metadata(other)["model"] == "mine"


def test_save_refuses_to_replace_a_fifo(tmp_path):
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    link = tmp_path / "link.safetensors"
    link.symlink_to(fifo)
    for path in (fifo, link):
        with pytest.raises(ValueError, match=r"^path must be the path of the checkpoint file to "
                                             r"write, got .* \(an existing FIFO, not a regular "
                                             r"file\)$"):
            checkpoint.save(mlp(), path)
    assert fifo.is_fifo() and link.is_symlink() and sorted(os.listdir(tmp_path)) == [
        "link.safetensors", "model.safetensors"]


@pytest.mark.parametrize("link", ["to nothing", "loop"])
def test_save_names_a_broken_link_on_the_way(tmp_path, link):
    broken = tmp_path / "out"
    if link == "loop":
        (tmp_path / "other").symlink_to(broken)
        broken.symlink_to(tmp_path / "other")
    else:
        broken.symlink_to(tmp_path / "nowhere")
    listed = sorted(os.listdir(tmp_path))
    with pytest.raises(ValueError, match=r"^path must be the path of the checkpoint file to "
                                         r"write, got .*out/sub/model\.safetensors' \(.*out' is "
                                         r"a broken symbolic link, not a directory\)$"):
        checkpoint.save(mlp(), broken / "sub" / "model.safetensors")
    assert sorted(os.listdir(tmp_path)) == listed


def test_load_refuses_inference_tensors_outside_inference_mode(tmp_path):
    path = tmp_path / "model.safetensors"
    source = mlp()
    masks = sparsekit.prune(source, 0.5)
    checkpoint.save(source, path, masks)
    model = _inference_model()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"^model: tensor '0\.weight' is an inference tensor"):
        checkpoint.load(model, path)
    assert unchanged(model, before)
    with torch.inference_mode():  # where PyTorch writes them
        loaded = checkpoint.load(model, path)
    assert torch.equal(model[0].weight, source[0].weight) and loaded.masks.keys() == {
        "0.weight", "2.weight"}


def _rewrite_header(path, edit) -> None:  # noqa: ANN001
    """Rewrite the safetensors header of ``path`` with ``edit(header)``, bytes of the
    tensors kept (a tampered file: its seal is not renewed)."""
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + size])
    edit(header)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + size:])


@pytest.mark.parametrize("field, value", [("encoding", ["bitmap"]), ("dtype", {"a": 1})])
def test_a_header_entry_of_the_wrong_json_type_is_a_value_error(tmp_path, field, value):
    path = tmp_path / "model.safetensors"
    source = mlp()
    checkpoint.save(source, path, sparsekit.prune(source, 0.5))

    def edit(header: dict) -> None:
        entries = json.loads(header["__metadata__"]["tensors"])
        entries["0.weight"][field] = value
        header["__metadata__"]["tensors"] = json.dumps(entries)

    _rewrite_header(path, edit)
    model = mlp()
    before = snapshot(model)
    for call in (lambda: checkpoint.load(model, path), lambda: checkpoint.read(path)):
        with pytest.raises(ValueError, match=rf"header entry '0\.weight': {field} "):
            call()
    assert unchanged(model, before)


# -- accelerate -----------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["model None", "model str", "accelerator class"])
def test_accelerate_attach_names_a_model_or_accelerator_of_the_wrong_kind(case):
    accelerate = pytest.importorskip("accelerate")
    from sparsekit.integrations.accelerate import attach

    model = mlp()
    masks = sparsekit.prune(model, 0.5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    accelerator = accelerate.Accelerator(cpu=True)
    args = {"model None": (accelerator, None), "model str": (accelerator, "model"),
            "accelerator class": (accelerate.Accelerator, model)}[case]
    match = (r"^accelerator must be an accelerate\.Accelerator, got the class Accelerator$"
             if case == "accelerator class" else r"^model must be an nn\.Module, got ")
    with pytest.raises(ArgumentTypeError, match=match):
        attach(args[0], masks, args[1], optimizer)
    assert _hooks(optimizer) == (0, 0) and not masks._optimizers
