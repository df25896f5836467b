"""LoRA on a pruned model: every merge keeps the zeros of the base."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsekit
from sparsekit._checks import ArgumentTypeError

peft = pytest.importorskip("peft")
from sparsekit.finetune import merge_lora, sparse_lora  # noqa: E402
from sparsekit.finetune.lora import MASK_NAME, layer_masks  # noqa: E402


def _pruned(seed: int = 0) -> tuple[nn.Module, sparsekit.MaskSet]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 5))
    return model, sparsekit.prune(model, 0.5)


def _config(**kw) -> "peft.LoraConfig":
    # init_lora_weights=False: B is random too, so the update is nonzero from the start
    return peft.LoraConfig(r=3, lora_alpha=6, target_modules=["0", "2"],
                           init_lora_weights=False, **kw)


def _zeros_kept(model: nn.Module, masks: dict[str, torch.Tensor]) -> bool:
    params = dict(model.named_parameters())
    return all(bool((params[n][~m] == 0).all()) for n, m in masks.items())


@pytest.mark.parametrize("how", ["peft", "sparsekit"])
def test_masked_forward_merges_to_exactly_the_trained_model(how):
    model, masks = _pruned()
    pruned = {n: m.clone() for n, m in masks.masks.items()}
    lora = sparse_lora(model, _config(), masks)
    x = torch.randn(7, 12)
    with torch.no_grad():
        before = lora(x)
    merged = lora.merge_and_unload() if how == "peft" else merge_lora(lora)
    assert not any(isinstance(m, peft.tuners.lora.LoraLayer) for m in merged.modules())
    assert _zeros_kept(merged, pruned)
    with torch.no_grad():
        torch.testing.assert_close(merged(x), before, rtol=1e-5, atol=1e-6)


def test_plain_forward_merge_drops_exactly_the_masked_out_update():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(12, 6))
    masks = sparsekit.prune(model, 0.5)
    keep = masks.masks["0.weight"].clone()
    lora = sparse_lora(model, peft.LoraConfig(r=2, target_modules=["0"], init_lora_weights=False),
                       masks, masked_forward=False)
    layer = next(m for m in lora.modules() if isinstance(m, peft.tuners.lora.LoraLayer))
    x = torch.randn(4, 12)
    with torch.no_grad():
        trained = lora(x)
        update = layer.get_delta_weight("default")  # s·B@A, dense
    merged = merge_lora(lora)
    assert bool((merged[0].weight[~keep] == 0).all())
    with torch.no_grad():  # what changes: the update's part on pruned weights, s·((B@A) ⊙ ¬M) x
        torch.testing.assert_close(merged(x), trained - F.linear(x, update * ~keep),
                                   rtol=1e-5, atol=1e-6)
        assert not torch.allclose(merged(x), trained, atol=1e-4)


def test_masks_read_from_zeros_without_a_maskset():
    model, masks = _pruned(2)
    pruned = {n: m.clone() for n, m in masks.masks.items()}
    lora = sparse_lora(model, _config())  # no MaskSet: the zeros are the mask
    assert set(layer_masks(lora)) == {"base_model.model.0.base_layer.weight",
                                      "base_model.model.2.base_layer.weight"}
    merged = merge_lora(lora)
    assert _zeros_kept(merged, pruned)


def test_merge_keeps_zeros_of_a_plain_peft_model():
    model, masks = _pruned(3)
    pruned = {n: m.clone() for n, m in masks.masks.items()}
    lora = peft.get_peft_model(model, _config())  # built without sparsekit
    x = torch.randn(3, 12)
    with torch.no_grad():
        lora(x)  # the plain forward still runs
    merged = merge_lora(lora, masks)
    assert _zeros_kept(merged, pruned)


def test_dense_layers_merge_as_plain_lora():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 5))
    masks = sparsekit.prune(model, 0.5, targets=["0"])  # layer 2 stays dense
    lora = sparse_lora(model, _config(), masks)
    layers = {n: m for n, m in lora.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert hasattr(layers["base_model.model.0"], MASK_NAME)
    assert not hasattr(layers["base_model.model.2"], MASK_NAME)
    assert "default" not in layers["base_model.model.2"].lora_variant


def test_gpt2_conv1d_keeps_its_zeros():
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(5)
    model = nn.Sequential(Conv1D(10, 6))  # weight stored (in, out) = (6, 10)
    masks = sparsekit.prune(model, 0.5)
    pruned = {n: m.clone() for n, m in masks.masks.items()}
    lora = sparse_lora(model, peft.LoraConfig(r=2, target_modules=["0"], fan_in_fan_out=True,
                                              init_lora_weights=False), masks)
    x = torch.randn(3, 6)
    with torch.no_grad():
        before = lora(x)
    merged = lora.merge_and_unload()
    assert _zeros_kept(merged, pruned)
    with torch.no_grad():
        torch.testing.assert_close(merged(x), before, rtol=1e-5, atol=1e-6)


def test_training_then_merge_keeps_zeros_and_outputs():
    model, masks = _pruned(6)
    pruned = {n: m.clone() for n, m in masks.masks.items()}
    lora = sparse_lora(model, peft.LoraConfig(r=2, target_modules=["0", "2"]), masks)
    trainable = [p for p in lora.parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, p in lora.named_parameters() if p.requires_grad)
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    x, y = torch.randn(32, 12), torch.randint(0, 5, (32,))
    for _ in range(5):
        F.cross_entropy(lora(x), y).backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        before = lora(x)
    merged = merge_lora(lora)
    assert _zeros_kept(merged, pruned)
    with torch.no_grad():
        torch.testing.assert_close(merged(x), before, rtol=1e-5, atol=1e-5)


# -- hostile input: clear errors, nothing changed --------------------------------------------

def _unchanged(model: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    now = model.state_dict()
    return now.keys() == state.keys() and all(torch.equal(now[k], v) for k, v in state.items()) \
        and all(p.requires_grad for p in model.parameters())


def test_masks_of_another_model_are_refused():
    model, _ = _pruned(7)
    _, other = _pruned(8)
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="another model"):
        sparse_lora(model, _config(), other)
    assert _unchanged(model, state)


@pytest.mark.parametrize("config, error, match", [
    ({"r": 2}, TypeError, "peft.LoraConfig"),
    (None, TypeError, "peft.LoraConfig"),
])
def test_a_config_that_is_no_lora_config_is_refused(config, error, match):
    model, masks = _pruned(9)
    with pytest.raises(error, match=match):
        sparse_lora(model, config, masks)


def test_dora_is_refused():
    model, masks = _pruned(10)
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="use_dora"):
        sparse_lora(model, peft.LoraConfig(r=2, target_modules=["0"], use_dora=True), masks)
    assert _unchanged(model, state)


def _drifted(seed: int) -> tuple[nn.Module, sparsekit.MaskSet, dict[str, torch.Tensor]]:
    """A pruned model whose pruned weights drifted off zero, with its state."""
    model, masks = _pruned(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    return model, masks, copy.deepcopy(model.state_dict())


@pytest.mark.parametrize("kw, error, match", [
    ({"r": 2.5}, ArgumentTypeError, "config.r must be an int ≥ 1, got 2.5"),
    ({"r": True}, ArgumentTypeError, "config.r must be an int ≥ 1, got True"),
    ({"r": 0}, ValueError, "config.r must be an int ≥ 1, got 0"),
    ({"lora_alpha": math.nan}, ValueError, "config.lora_alpha must be a positive finite"),
    ({"lora_alpha": math.inf}, ValueError, "config.lora_alpha must be a positive finite"),
    ({"lora_alpha": 0}, ValueError, "config.lora_alpha must be a positive finite"),
    ({"rank_pattern": {"0": 1.5}}, ArgumentTypeError, r"config.rank_pattern\['0'\]"),
    ({"alpha_pattern": {"2": math.nan}}, ValueError, r"config.alpha_pattern\['2'\]"),
])
def test_bad_ranks_and_scales_are_refused(kw, error, match):
    model, masks, state = _drifted(13)
    with pytest.raises(error, match=match):
        sparse_lora(model, peft.LoraConfig(**{"r": 2, "target_modules": ["0", "2"], **kw}),
                    masks)
    assert _unchanged(model, state)


@pytest.mark.parametrize("targets", [["nothere"], ["0", "1"]])  # "1" is a ReLU
def test_targets_peft_refuses_leave_the_model_as_it_came(targets):
    model, masks, state = _drifted(14)
    layers = list(model)
    with pytest.raises(ValueError, match="[Tt]arget module"):  # peft's own message
        sparse_lora(model, peft.LoraConfig(r=2, target_modules=targets), masks)
    assert _unchanged(model, state)  # the drifted weights are not masked yet
    assert list(model) == layers  # "0", wrapped before "1" failed, is put back


def test_masks_are_applied_once_the_adapters_are_in_place():
    model, masks, _ = _drifted(15)
    lora = sparse_lora(model, _config(), masks)
    assert _zeros_kept(lora.get_base_model(), {
        n.replace(".weight", ".base_layer.weight"): m for n, m in masks.masks.items()})


def test_a_sparse_conv_base_is_refused_and_the_model_restored():
    torch.manual_seed(11)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(1, 3, 6, 6))
    masks = sparsekit.prune(model, 0.5, targets=["0"])
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(TypeError, match="only Linear and GPT-2 Conv1D"):
        sparse_lora(model, peft.LoraConfig(r=2, target_modules=["0"]), masks)
    assert _unchanged(model, state)
    assert not any(isinstance(m, peft.tuners.lora.LoraLayer) for m in model.modules())


def test_wrong_argument_types_are_refused():
    model, masks = _pruned(12)
    with pytest.raises(TypeError, match="masked_forward"):
        sparse_lora(model, _config(), masks, masked_forward=1)
    with pytest.raises(TypeError, match="masks must be a MaskSet"):
        sparse_lora(model, _config(), {"0.weight": masks.masks["0.weight"]})
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        sparse_lora("model", _config(), masks)
    lora = sparse_lora(model, _config(), masks)
    with pytest.raises(ValueError, match="config must be None for a PeftModel"):
        sparse_lora(lora, _config())
    with pytest.raises(TypeError, match="peft model"):
        merge_lora(nn.Linear(2, 2))
