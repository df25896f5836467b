"""sparsekit.blocks: find transformer blocks, capture their calls, replay them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparsekit.blocks import (
    BlockCall,
    BlockReplay,
    capture_inputs,
    find_blocks,
    home_device,
    to_device,
)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, hidden_states: torch.Tensor, scale: torch.Tensor, *, shift: float = 0.0):
        return (torch.tanh(self.fc(hidden_states)) * scale + shift, "extra")


class Toy(nn.Module):
    """Embedding, three blocks called with a positional extra and a keyword, a head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(16, 8)
        self.layers = nn.ModuleList(Block() for _ in range(3))
        self.small = nn.ModuleList([nn.Linear(8, 8)])  # a smaller list: not the blocks
        self.head = nn.Linear(8, 16)
        self.calls: list[str] = []

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        scale = torch.full((1,), 0.5)
        for i, layer in enumerate(self.layers):
            self.calls.append(f"layer{i}")
            h = layer(h, scale, shift=0.1)[0]
        return self.head(h)


def tokens(n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 16, (n, 5), generator=torch.Generator().manual_seed(seed))


def block_inputs(model: Toy, x: torch.Tensor) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    handles = [b.register_forward_pre_hook(lambda m, a: seen.append(a[0])) for b in model.layers]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return seen


def test_find_blocks_picks_the_largest_list_of_identical_blocks():
    model = Toy()
    assert find_blocks(model) is model.layers
    with pytest.raises(ValueError, match="no list of transformer blocks"):
        find_blocks(nn.Sequential(nn.Linear(2, 2)))


def test_capture_stops_at_the_last_block_and_replay_reproduces_its_output():
    model = Toy()
    batches = [tokens(2, 0), tokens(3, 1)]
    ((hidden, calls),) = capture_inputs(model, [model.layers[1]], batches)
    assert model.calls == ["layer0", "layer1"] * 2  # stopped before layer 2, for each batch
    assert len(hidden) == len(calls) == 2
    for x, h, call in zip(batches, hidden, calls):
        expected = block_inputs(model, x)
        torch.testing.assert_close(h, expected[1])
        torch.testing.assert_close(call(model.layers[1], h), expected[2])
        assert call.kwargs == {"shift": 0.1} and call.hidden_key is None


def test_one_call_replays_on_every_block_of_the_kind():
    model = Toy()
    x = tokens()
    ((hidden, calls),) = capture_inputs(model, [model.layers[0]], [x])
    h = hidden[0]
    for block in model.layers:
        h = calls[0](block, h)
    with torch.no_grad():
        torch.testing.assert_close(model.head(h), model(x))


def test_capture_of_several_blocks_in_one_pass_keeps_the_first_call():
    model = Toy()
    x = tokens()
    captured = capture_inputs(model, list(model.layers), [x])
    for (hidden, _), expected in zip(captured, block_inputs(model, x)):
        torch.testing.assert_close(hidden[0], expected)


def test_capture_names_blocks_never_reached_and_restores_the_model():
    model = Toy().train()
    with pytest.raises(ValueError, match=r"never reached blocks \[0\]"):
        capture_inputs(model, [nn.Linear(8, 8)], [tokens()])
    assert model.training and all(not b._forward_pre_hooks for b in model.layers)


def test_hidden_states_passed_by_keyword_are_replayed_by_keyword():
    block = Block()
    call = BlockCall((), {"scale": torch.ones(1)}, "hidden_states")
    h = torch.randn(2, 8)
    torch.testing.assert_close(call(block, h), block(h, torch.ones(1))[0])


def test_block_replay_reruns_blocks_with_hooks_installed_in_between():
    model = Toy()
    data = [torch.empty(0, 5, dtype=torch.long), tokens(2, 0), tokens(2, 1)]
    replay = BlockReplay(model, ["layers.0", "layers.2"], data)
    reference = replay("layers.2")
    torch.testing.assert_close(reference, model.layers[2](block_inputs(model, data[1])[2],
                                                          torch.full((1,), 0.5), shift=0.1)[0])
    handle = model.layers[2].fc.register_forward_pre_hook(lambda m, a: (a[0] * 0,))
    changed = replay("layers.2")
    handle.remove()
    assert not torch.allclose(changed, reference)
    torch.testing.assert_close(replay("layers.2"), reference)
    with pytest.raises(ValueError, match="not modules"):
        BlockReplay(model, ["layers.9"], data)
    with pytest.raises(ValueError, match="calibration holds no"):
        BlockReplay(model, ["layers.0"], [], "calibration")


def test_replays_do_not_grow_a_key_value_cache():
    """A replay that passed the forward pass's cache on would attend to earlier replays."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(config).eval()
    replay = BlockReplay(model, ["model.layers.1"], torch.randint(0, 32, (2, 6)))
    reference = replay("model.layers.1")
    k_proj = model.model.layers[1].self_attn.k_proj
    handle = k_proj.register_forward_pre_hook(lambda m, a: (a[0] * 3,))
    replay("model.layers.1")
    handle.remove()
    torch.testing.assert_close(replay("model.layers.1"), reference)
    _, call = replay.calls["model.layers.1"]
    assert not any(type(v).__name__.endswith("Cache") for v in call.kwargs.values())


def test_to_device_moves_nested_tensors_only():
    obj = (torch.ones(1), [torch.zeros(1), "x"], {"a": torch.ones(2)}, 3)
    moved = to_device(obj, torch.device("cpu"))
    assert moved[1][1] == "x" and moved[3] == 3 and torch.equal(moved[2]["a"], torch.ones(2))
    assert to_device(obj, None) is obj


def test_home_device_is_where_the_first_parameter_lives() -> None:
    assert home_device(nn.Sequential(nn.ReLU())) is None  # nothing to say where inputs go
    assert home_device(nn.Linear(2, 2)) == torch.device("cpu")
    assert home_device(nn.Linear(2, 2, device="meta")) == torch.device("meta")
