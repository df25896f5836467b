import pytest
import torch
from torch import nn

from sparsekit.targets import DEFAULT_TYPES, batchnorm_scales, resolve_targets


class Net(nn.Module):
    """conv → bn → (layers: Linear, ReLU, Linear) → fc, plus a Conv1d head and an Embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.layers = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8))
        self.head = nn.Conv1d(1, 2, 3, bias=False)
        self.emb = nn.Embedding(5, 4)
        self.fc = nn.Linear(8, 3)


def names(targets) -> list[str]:
    return [t.name for t in targets]


def test_default_types():
    assert (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d) == DEFAULT_TYPES


def test_default_targets_are_linear_and_conv_weights_only():
    assert names(resolve_targets(Net())) == [
        "conv.weight",
        "layers.0.weight",
        "layers.2.weight",
        "head.weight",
        "fc.weight",
    ]


def test_default_targets_include_conv3d():
    model = nn.Sequential(nn.Conv3d(1, 2, 2), nn.BatchNorm3d(2))
    assert names(resolve_targets(model)) == ["0.weight"]


def test_target_fields():
    model = Net()
    t = resolve_targets(model, "layers.2")[0]
    assert t.name == "layers.2.weight"
    assert t.module_name == "layers.2"
    assert t.module is model.layers[2]
    assert t.param is model.layers[2].weight


def test_root_module_is_targetable():
    lin = nn.Linear(3, 2)
    targets = resolve_targets(lin)
    assert names(targets) == ["weight"]
    assert targets[0].module is lin and targets[0].module_name == ""


@pytest.mark.parametrize(
    "spec, expected",
    [
        (nn.Linear, ["layers.0.weight", "layers.2.weight", "fc.weight"]),
        (nn.Conv2d, ["conv.weight"]),
        (nn.Conv1d, ["head.weight"]),
        (nn.BatchNorm2d, ["bn.weight"]),
        (nn.Embedding, ["emb.weight"]),
        ([nn.Conv2d, nn.Embedding], ["conv.weight", "emb.weight"]),
        ((nn.Conv2d, nn.Conv1d), ["conv.weight", "head.weight"]),
    ],
)
def test_module_type(spec, expected):
    assert names(resolve_targets(Net(), spec)) == expected


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("fc", ["fc.weight"]),
        ("layers.0", ["layers.0.weight"]),
        ("emb", ["emb.weight"]),
        ("bn", ["bn.weight"]),
        ("fc.weight", ["fc.weight"]),
        ("fc.bias", ["fc.bias"]),
        ("bn.bias", ["bn.bias"]),
        (["fc", "fc.bias"], ["fc.weight", "fc.bias"]),
        (["conv", nn.Linear], ["conv.weight", "layers.0.weight", "layers.2.weight", "fc.weight"]),
        ("*.bias", ["conv.bias", "bn.bias", "layers.0.bias", "layers.2.bias", "fc.bias"]),
        ("layers.[02]", ["layers.0.weight", "layers.2.weight"]),
        ("layers.?.weight", ["layers.0.weight", "layers.2.weight"]),
    ],
)
def test_names_and_globs(spec, expected):
    assert names(resolve_targets(Net(), spec)) == expected


def test_glob_layers_star_selects_every_layer_weight():
    got = names(resolve_targets(Net(), "layers.*"))
    assert "layers.0.weight" in got and "layers.2.weight" in got
    assert all(n.startswith("layers.") for n in got)


def test_glob_layers_star_selects_weights_not_biases():
    assert names(resolve_targets(Net(), "layers.*")) == ["layers.0.weight", "layers.2.weight"]


def test_bn_running_stats_are_never_targets():
    with pytest.raises(ValueError, match="matches no module or parameter"):
        resolve_targets(Net(), "bn.running_mean")


@pytest.mark.parametrize(
    "exclude, expected",
    [
        (["fc"], ["conv.weight", "layers.0.weight", "layers.2.weight", "head.weight"]),
        ("fc", ["conv.weight", "layers.0.weight", "layers.2.weight", "head.weight"]),
        (["fc.weight"], ["conv.weight", "layers.0.weight", "layers.2.weight", "head.weight"]),
        (["layers.*"], ["conv.weight", "head.weight", "fc.weight"]),
        (["layers.0", "head"], ["conv.weight", "layers.2.weight", "fc.weight"]),
        (["*conv*"], ["layers.0.weight", "layers.2.weight", "head.weight", "fc.weight"]),
    ],
)
def test_exclude(exclude, expected):
    assert names(resolve_targets(Net(), exclude=exclude)) == expected


def test_exclude_applies_after_explicit_targets():
    got = resolve_targets(Net(), targets=["fc", "fc.bias", "conv"], exclude=["fc.bias"])
    assert names(got) == ["conv.weight", "fc.weight"]


def test_order_follows_named_parameters():
    model = Net()
    order = [n for n, _ in model.named_parameters()]
    got = names(resolve_targets(model, ["fc", "head", "layers.2", "conv", "fc.bias", "bn"]))
    assert got == ["conv.weight", "bn.weight", "layers.2.weight", "head.weight", "fc.weight",
                   "fc.bias"]
    assert got == sorted(got, key=order.index)


def test_duplicate_specs_give_one_target():
    got = names(resolve_targets(Net(), ["fc", "fc.weight", nn.Linear, "fc"]))
    assert got == ["layers.0.weight", "layers.2.weight", "fc.weight"]


def test_shared_parameter_is_one_target():
    lin = nn.Linear(4, 4)
    model = nn.Sequential(lin, nn.ReLU(), lin)
    assert names(resolve_targets(model)) == ["0.weight"]


def test_targets_entry_matching_nothing():
    with pytest.raises(ValueError, match=r"targets entry 'nope' matches no module or parameter"):
        resolve_targets(Net(), ["fc", "nope"])


def test_targets_type_matching_nothing():
    with pytest.raises(ValueError, match="targets entry Conv3d matches no"):
        resolve_targets(Net(), nn.Conv3d)


def test_exclude_entry_matching_nothing_lists_targets():
    with pytest.raises(ValueError, match="exclude entry 'fc2' matches none") as err:
        resolve_targets(Net(), exclude=["fc2"])
    assert "layers.0.weight" in str(err.value)


def test_exclude_everything():
    with pytest.raises(ValueError, match="no parameters left"):
        resolve_targets(Net(), targets="fc", exclude=["fc"])


@pytest.mark.parametrize("targets", [3, [3], [nn.ReLU()], [int]])
def test_bad_target_types(targets):
    with pytest.raises(TypeError, match="targets"):
        resolve_targets(Net(), targets)


def test_bad_exclude_type():
    with pytest.raises(TypeError, match="exclude"):
        resolve_targets(Net(), exclude=[nn.Linear])


def test_model_must_be_module():
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        resolve_targets({"w": torch.zeros(2)})


def test_integer_weight_is_type_error():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    model[0].weight = nn.Parameter(torch.zeros(4, 4, dtype=torch.int64), requires_grad=False)
    with pytest.raises(TypeError, match=r"'0\.weight' has dtype torch\.int64"):
        resolve_targets(model)
    # an excluded integer weight is fine
    assert names(resolve_targets(model, exclude=["0"])) == ["1.weight"]


class Tied(nn.Module):
    """An embedding whose weight is shared with the output Linear (weight tying)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(8, 4)
        self.hidden = nn.Linear(4, 4)
        self.out = nn.Linear(4, 8, bias=False)
        self.out.weight = self.emb.weight


def test_tied_embedding_is_not_a_default_target():
    # issue 17.13: the default targets reached the embedding through the tied output Linear
    model = Tied()
    assert names(resolve_targets(model)) == ["hidden.weight"]


def test_tied_weight_named_explicitly_is_listed_once_under_its_owner():
    model = Tied()
    assert names(resolve_targets(model, ["out"])) == ["emb.weight"]
    assert names(resolve_targets(model, ["out", "emb.weight"])) == ["emb.weight"]


def test_gpt2_default_pruning_leaves_the_tied_embedding_dense():
    transformers = pytest.importorskip("transformers")
    import sparsekit

    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64,
                                     n_positions=16, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config)
    assert model.lm_head.weight is model.transformer.wte.weight
    # lm_head is tied to the embedding: never a default target (it would zero half of
    # wte); the blocks' Conv1D layers are (issue 14: they used to be skipped, leaving
    # nothing to prune)
    assert [t.module_name for t in resolve_targets(model)] == [
        "transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj",
        "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"]
    sparsekit.prune(model, 0.5)
    assert (model.transformer.wte.weight != 0).all()


def test_exclude_none_means_nothing_excluded():
    assert names(resolve_targets(Net(), exclude=None)) == names(resolve_targets(Net()))


def test_batchnorm_scales_are_the_affine_weights_of_every_batchnorm():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1),
                          nn.BatchNorm2d(2, affine=False), nn.Flatten(), nn.Linear(8, 3),
                          nn.BatchNorm1d(3), nn.LayerNorm(3))
    scales = batchnorm_scales(model)
    assert [t.name for t in scales] == ["1.weight", "6.weight"]  # no γ: no scale; not LayerNorm
    assert scales[0].param is model[1].weight and scales[0].module_name == "1"
    assert [t.name for t in resolve_targets(model)] == ["0.weight", "2.weight", "5.weight"]
