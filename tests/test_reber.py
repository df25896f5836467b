import re

import pytest
import torch

from sparsekit.data import SYMBOLS, reber, reber_accuracy

# The grammar written independently of the automaton, by state elimination.
REBER = r"B(?:(?:TS*X|PT*VP)(?:XT*VP)*(?:S|XT*VV)|PT*VV)E"
EMBEDDED = rf"B(?:T{REBER}T|P{REBER}P)E"


@pytest.mark.parametrize("embedded", [False, True])
def test_every_string_is_in_the_grammar(embedded):
    data = reber(300, embedded=embedded, seed=3)
    pattern = re.compile(EMBEDDED if embedded else REBER)
    assert all(pattern.fullmatch(s) for s in data.strings)
    assert len(set(data.strings)) > 30


@pytest.mark.parametrize("embedded", [False, True])
def test_layout_inputs_and_padding(embedded):
    data = reber(50, embedded=embedded, seed=0)
    n, steps, k = data.inputs.shape
    assert (n, k) == (50, 7) and data.targets.shape == data.inputs.shape
    assert steps == int(data.lengths.max())
    for i, s in enumerate(data.strings):
        length = len(s) - 1
        assert data.lengths[i] == length
        assert "".join(SYMBOLS[j] for j in data.inputs[i, :length].argmax(-1)) == s[:-1]
        assert data.inputs[i, length:].sum() == 0 and data.targets[i, length:].sum() == 0
        # the actual next symbol is always legal
        nxt = torch.tensor([SYMBOLS.index(c) for c in s[1:]])
        assert data.targets[i, torch.arange(length), nxt].all()


def legal(data, i):
    rows = data.targets[i, : int(data.lengths[i])]
    return ["".join(SYMBOLS[j] for j in row.nonzero().flatten()) for row in rows]


def test_targets_are_the_legal_next_symbols():
    data = reber(500, seed=0)
    assert legal(data, data.strings.index("BTSXSE")) == ["TP", "SX", "SX", "SX", "E"]
    assert legal(data, data.strings.index("BPVVE")) == ["TP", "TV", "PV", "E"]


def test_embedded_targets_remember_the_branch():
    data = reber(200, embedded=True, seed=1)
    for i, s in enumerate(data.strings):
        sets = legal(data, i)
        assert sets[0] == "TP" and sets[1] == "B"
        assert sets[-2] == s[1] and sets[-1] == "E"  # only the branch symbol, then E


def test_seeds_reproduce():
    a, b, c = reber(20, seed=5), reber(20, seed=5), reber(20, seed=6)
    assert a.strings == b.strings and torch.equal(a.targets, b.targets)
    assert a.strings != c.strings


def test_accuracy_counts_legal_argmax_on_real_steps():
    targets = torch.zeros(1, 3, 7)
    targets[0, 0, [1, 2]] = 1  # T or P
    targets[0, 1, 6] = 1  # E; step 2 is padding
    logits = torch.zeros(1, 3, 7)
    logits[0, 0, 2] = 1  # P: legal
    logits[0, 1, 0] = 1  # B: illegal
    assert reber_accuracy(logits, targets) == 0.5
    with pytest.raises(ValueError, match="same shape"):
        reber_accuracy(logits[:, :2], targets)


def test_bad_n():
    with pytest.raises(ValueError, match="n must be"):
        reber(0)


def test_embedded_must_be_a_bool():
    with pytest.raises(TypeError, match=r"embedded must be a bool \(True or False\), got 'no'"):
        reber(2, embedded="no")


def test_accuracy_refuses_nan_logits_and_scalars():
    targets = reber(1).targets[:, :3]
    with pytest.raises(ValueError, match="logits must be numbers or ±inf, got 21 NaN of 21"):
        reber_accuracy(torch.full((1, 3, 7), float("nan")), targets)
    with pytest.raises(ValueError, match=r"same shape \(\.\.\., symbols\), got \(\) and \(\)"):
        reber_accuracy(torch.tensor(1.0), torch.tensor(1.0))
