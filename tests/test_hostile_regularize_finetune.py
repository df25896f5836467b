"""Hostile inputs to sparsekit.regularize and sparsekit.finetune (LoRA, masked deltas)."""

import copy
import pickle

import pytest
import torch
from torch import nn

from sparsekit._checks import ArgumentTypeError
from sparsekit.finetune import Delta
from sparsekit.regularize import GroupEnvelope, GroupLasso, SoftThreshold, channel_norms
from sparsekit.structured import dependency_groups
from sparsekit.structured.dependency import Group, Slice


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


# -- regularize ------------------------------------------------------------------------------


def test_channel_norms_refuses_a_group_of_another_model():
    """channel_norms(model, foreign_group) used to return zeros, silently."""
    group = dependency_groups(mlp())[0]
    with pytest.raises(ValueError, match="does not fit model"):
        channel_norms(nn.Linear(2, 2), group)
    with pytest.raises(ArgumentTypeError, match="group must be a Group"):
        channel_norms(mlp(), "0")


@pytest.mark.parametrize("build", [
    lambda m: GroupLasso(m, 0.1, groups=[]),
    lambda m: GroupEnvelope(m, 0.1, 0.5, groups=[]),
    lambda m: SoftThreshold(torch.optim.SGD(m.parameters(), lr=0.1), 0.1, model=m, groups=[]),
])
def test_regularisers_refuse_empty_groups(build):
    """groups=[] used to give a penalty of 0 and a proximal step that did nothing."""
    with pytest.raises(ValueError, match="groups is empty"):
        build(mlp())


def test_group_lasso_refuses_a_model_without_groups():
    """GroupLasso(nn.Linear(3, 3), 0.1)() used to be 0 at every step, silently."""
    with pytest.raises(ValueError, match="no dependency groups"):
        GroupLasso(nn.Linear(3, 3), 0.1)


def test_regularisers_refuse_a_group_of_no_channels():
    """A Group of 0 channels used to fail in reshape with a raw RuntimeError."""
    empty = Group("0", 0, (Slice("0.weight", 0, "out"),))
    with pytest.raises(ValueError, match=r"groups\[0\].channels must be an int ≥ 1, got 0"):
        GroupEnvelope(mlp(), 0.1, 0.5, groups=[empty])


def test_regularisers_name_a_wrong_model_type():
    """SoftThreshold(model='x', groups=...) used to raise a raw AttributeError."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ArgumentTypeError, match="model must be an nn.Module or None, got str"):
        SoftThreshold(opt, 0.1, model="x", groups=dependency_groups(model))
    with pytest.raises(ArgumentTypeError, match="model must be an nn.Module, got str"):
        GroupLasso("x", 0.1)


def test_group_lasso_float16_has_finite_gradients():
    """float16 weights used to give NaN gradients at a zero channel and inf norms at 300."""
    model = mlp().half()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    GroupLasso(model, 0.1)().backward()
    assert all(p.grad.isfinite().all() for p in model.parameters() if p.grad is not None)
    with torch.no_grad():
        model[0].weight.fill_(300.0)
    assert channel_norms(model, dependency_groups(model)[0]).isfinite().all()


def test_soft_threshold_copies_and_pickles():
    """copy.deepcopy and pickle of a SoftThreshold used to recurse forever in __getattr__."""
    model = mlp()
    st = SoftThreshold(torch.optim.SGD(model.parameters(), lr=0.1), 0.1)
    for clone in (copy.deepcopy(st), pickle.loads(pickle.dumps(st))):
        assert clone.strength == 0.1
        assert len(clone.param_groups[0]["params"]) == 4


def test_soft_threshold_works_with_lr_schedulers():
    """StepLR(SoftThreshold(...)) used to raise 'SoftThreshold is not an Optimizer'."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    st = SoftThreshold(opt, 0.1)
    sched = torch.optim.lr_scheduler.StepLR(st, step_size=1, gamma=0.5)
    model(torch.randn(2, 4)).sum().backward()
    st.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    assert st.param_groups is opt.param_groups


def test_soft_threshold_state_dict_round_trip_is_exact():
    """Exact before too; guards the resume now that SoftThreshold is an Optimizer subclass."""
    def run(model, st, steps):
        for _ in range(steps):
            st.zero_grad()
            model(torch.ones(2, 4)).pow(2).sum().backward()
            st.step()

    a = mlp()
    b = copy.deepcopy(a)
    sa = SoftThreshold(torch.optim.Adam(a.parameters(), lr=0.01), 0.1)
    run(a, sa, 3)
    b.load_state_dict(a.state_dict())
    sb = SoftThreshold(torch.optim.Adam(b.parameters(), lr=0.01), 0.1)
    sb.load_state_dict(copy.deepcopy(sa.state_dict()))
    run(a, sa, 2)
    run(b, sb, 2)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_soft_threshold_checks_the_learning_rate_before_stepping():
    """Learning rates diverging after construction used to raise after the optimizer had
    stepped the weights."""
    model = mlp()
    opt = torch.optim.SGD([{"params": model[0].parameters()},
                           {"params": model[2].parameters()}], lr=0.1)
    st = SoftThreshold(opt, 0.1, model=model, groups=dependency_groups(model))
    opt.param_groups[1]["lr"] = 0.05
    model(torch.randn(2, 4)).sum().backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="one learning rate"):
        st.step()
    assert all(torch.equal(x, p) for x, p in zip(before, model.parameters()))


def test_soft_threshold_leaves_frozen_parameters_alone():
    """Elementwise thresholding used to shrink parameters with requires_grad=False too."""
    model = mlp()
    model[0].weight.requires_grad_(False)
    frozen = model[0].weight.detach().clone()
    st = SoftThreshold(torch.optim.SGD(model.parameters(), lr=1.0), 0.1)
    model(torch.randn(2, 4)).sum().backward()
    st.step()
    assert torch.equal(model[0].weight, frozen)


# -- finetune --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_delta_with_negative_zeros_saves_and_loads(tmp_path, dtype):
    """A Delta built as values * mask (-0.0 where masked) used to pass the check but fail
    to save, advising masks.apply(), which a Delta does not have."""
    torch.manual_seed(0)
    mask = torch.rand(3, 4) > 0.5
    values = torch.randn(3, 4, dtype=dtype) * mask
    delta = Delta({"a.weight": values}, {"a.weight": mask})
    loaded = Delta.load(delta.save(tmp_path / "d.safetensors"))
    assert loaded.values["a.weight"].dtype == dtype
    assert torch.equal(loaded.values["a.weight"], values)
    assert torch.equal(loaded.masks["a.weight"], mask)


def _llama() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "proj" in n:
                p.mul_(torch.rand_like(p) > 0.5)
    return model


@pytest.mark.parametrize("dropout", [-0.1, float("nan"), 1.0, 1.5])
def test_sparse_lora_rejects_a_bad_dropout(dropout):
    """lora_dropout=-0.1 or NaN used to be taken as no dropout, 1.0 zeroed every adapter
    input, and 1.5 failed inside peft without naming the parameter."""
    peft = pytest.importorskip("peft")
    from sparsekit.finetune import sparse_lora

    model = _llama()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    config = peft.LoraConfig(r=4, target_modules=["q_proj"], lora_dropout=dropout)
    with pytest.raises(ValueError, match=r"config.lora_dropout must be in \[0, 1\)"):
        sparse_lora(model, config)
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_sparse_lora_refuses_modules_to_save_with_a_sparse_weight():
    """modules_to_save=['o_proj'] used to train a dense copy that filled the pruned weights
    in when merged (1008 of them in this model)."""
    peft = pytest.importorskip("peft")
    from sparsekit.finetune import sparse_lora

    model = _llama()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    config = peft.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["o_proj"])
    with pytest.raises(ValueError, match="modules_to_save.*sparse weight"):
        sparse_lora(model, config)
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert not any(isinstance(m, peft.utils.ModulesToSaveWrapper) for m in model.modules())


def test_sparse_lora_refuses_a_model_with_lora_layers():
    """sparse_lora on a base it had wrapped before used to nest a second PeftModel."""
    peft = pytest.importorskip("peft")
    from sparsekit.finetune import sparse_lora

    model = _llama()
    sparse_lora(model, peft.LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="LoRA layers already"):
        sparse_lora(model, peft.LoraConfig(r=4, target_modules=["q_proj"]))
