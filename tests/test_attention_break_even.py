"""The measured break-even: dense or sparse attention per call class, timed once."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sparsekit._checks import ArgumentTypeError
from sparsekit.attention import apply, hf
from sparsekit.attention.break_even import BreakEven, call_class


class Clock:
    """Reads out scripted times: each path 'takes' what the script says."""

    def __init__(self, *times: float) -> None:
        self.now, self.steps = 0.0, list(times)

    def __call__(self) -> float:
        self.now += self.steps.pop(0) if self.steps else 0.0
        return self.now


def paths(log: list[str]):
    return (lambda: log.append("dense") or "dense out",
            lambda: log.append("sparse") or "sparse out")


def test_the_first_call_of_a_class_times_both_and_later_calls_run_the_winner():
    log: list[str] = []
    # clock reads: start, after dense (took 10), after sparse (took 5)
    even = BreakEven(margin=0.1, clock=Clock(0.0, 10.0, 5.0))
    assert even.run("long", *paths(log)) == "sparse out"
    assert log == ["dense", "sparse"] and even.decisions == {"long": True}
    log.clear()
    assert even.run("long", *paths(log)) == "sparse out" and log == ["sparse"]


def test_sparse_must_win_by_the_margin():
    log: list[str] = []
    even = BreakEven(margin=0.1, clock=Clock(0.0, 10.0, 9.5))  # 5 % faster: not enough
    assert even.run("short", *paths(log)) == "dense out"
    log.clear()
    assert even.run("short", *paths(log)) == "dense out" and log == ["dense"]
    exact = BreakEven(margin=0.0, clock=Clock(0.0, 10.0, 9.5))
    assert exact.run("short", *paths([])) == "sparse out"


def test_each_class_is_measured_on_its_own():
    even = BreakEven(clock=Clock(0.0, 10.0, 5.0, 0.0, 1.0, 5.0))
    assert even.run("prefill", *paths([])) == "sparse out"
    assert even.run("decode", *paths([])) == "dense out"
    assert even.decisions == {"prefill": True, "decode": False}


def test_a_trace_never_times_and_runs_dense_where_nothing_was_measured(monkeypatch):
    even = BreakEven(clock=Clock(0.0, 10.0, 5.0))
    assert even.run("measured", *paths([])) == "sparse out"
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    log: list[str] = []
    assert even.run("measured", *paths(log)) == "sparse out"
    assert even.run("new", *paths(log)) == "dense out"
    assert log == ["sparse", "dense"] and even.decisions == {"measured": True}


def test_call_classes_split_decode_prefill_and_key_octaves():
    def cls(q_len: int, kv_len: int, **kw):
        q, k = torch.zeros(1, 4, q_len, 8, **kw), torch.zeros(1, 2, kv_len, 8, **kw)
        return call_class(q, k, causal=True, block_size=64)

    assert cls(1, 5000) != cls(512, 5000)            # decode vs prefill
    assert cls(1, 5000) == cls(1, 6000)              # same octave of keys
    assert cls(1, 5000) != cls(1, 9000)              # keys doubled
    assert cls(1, 5000) != cls(1, 5000, dtype=torch.bfloat16)
    assert cls(1, 5000)[4] == 2                      # the key/value heads count (GQA)


def test_bad_margin_names_the_parameter():
    with pytest.raises(ValueError, match=r"margin must be in \[0, 1\), got 1.5"):
        BreakEven(margin=1.5)
    with pytest.raises(TypeError, match="margin must be a float"):
        BreakEven(margin="0.1")


@pytest.mark.parametrize("call", [["decode", 1], ("decode", [1])])
def test_an_unhashable_call_class_names_the_parameter(call):
    """A list (or a tuple holding one) was a raw "unhashable type" TypeError of the dict the
    decisions are kept in, raised after nothing said which argument it was."""
    log: list[str] = []
    with pytest.raises(ArgumentTypeError, match=r"call must be a hashable call class \(like "
                                                r"the tuple call_class returns\), got "):
        BreakEven().run(call, *paths(log))
    assert log == []


def test_the_hf_switch_measures_once_per_class_and_runs_the_winner(monkeypatch):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, attn_implementation="sdpa")
    model = LlamaForCausalLM(config).eval()
    x = torch.randint(0, 64, (1, 100), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense = model(x).logits
        apply(model, "dense", block_size=16)  # min_length None: measured
        settings = model.model.layers[0].self_attn.sparse_attention
        calls, real = [], hf.block_sparse_attention
        monkeypatch.setattr(hf, "block_sparse_attention",
                            lambda *a, **k: calls.append(a[0].shape[2]) or real(*a, **k))
        first = model(x).logits
        (won,) = settings.break_even.decisions.values()  # both layers share one class
        assert calls == [100] * (1 + won)  # layer 0 timed both; layer 1 ran the winner
        calls.clear()
        second = model(x).logits
    assert calls == [100] * (2 * won)
    torch.testing.assert_close(first, dense, rtol=1e-5, atol=1e-5)  # the full mask
    torch.testing.assert_close(second, dense, rtol=1e-5, atol=1e-5)
