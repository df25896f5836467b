"""Hostile cases for the decision cache, the training integrations and the plain training
loop: cache files that are devices, pipes or records no compile wrote; schedules a failed
attach leaves hooked; arguments of the wrong type; a resume without its state; train_epoch
arguments that failed only after training had begun."""

from __future__ import annotations

import json
import math
import os
import re
import threading
import types
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import sparsekit
from sparsekit import DynamicSparsity, GradualPruner
from sparsekit._checks import ArgumentTypeError
from sparsekit.engine import autotune, compile, decisions
from sparsekit.integrations import training

# -- the decision cache -------------------------------------------------------------------

CANDIDATES = ["dense", "torch_csr"]  # held by any fp32 CPU weight, kernels or not


class _Clock:
    """Stands in for ``autotune._time_block``: a fixed time per format, counted."""

    def __init__(self, **ms: float) -> None:
        self.ms, self.calls = ms, 0

    def __call__(self, module: nn.Module, x: torch.Tensor, reps: int) -> float:
        self.calls += 1
        return self.ms[module.format.name] * 1e-3


@pytest.fixture
def cache_dir(tmp_path, monkeypatch: pytest.MonkeyPatch):
    """A fresh decision cache, and a clock under which torch_csr wins clearly."""
    monkeypatch.setattr(decisions, "directory", lambda: tmp_path / "decisions")
    clock = _Clock(dense=1.0, torch_csr=0.5)
    monkeypatch.setattr(autotune, "_time_block", clock)
    return tmp_path / "decisions", clock


def _sparse(model: nn.Module) -> nn.Module:
    torch.manual_seed(1)
    with torch.no_grad():
        for layer in model:
            if hasattr(layer, "weight"):
                layer.weight.mul_(torch.rand(layer.weight.shape) > 0.8)
    return model.eval()


def _linear_model() -> nn.Module:
    torch.manual_seed(0)
    return _sparse(nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 8)))


def _conv_model() -> nn.Module:
    torch.manual_seed(0)
    return _sparse(nn.Sequential(nn.Conv2d(4, 8, 3)))


def _rewrite(directory, change) -> None:
    """Apply ``change`` to every stored decision record (the parsed JSON) and write it back."""
    files = sorted(directory.glob("*.json"))
    assert files
    for path in files:
        data = json.loads(path.read_text())
        change(data)
        path.write_text(json.dumps(data))


def _compile_again(build, x, clock):
    """Compile ``build()`` again on the cache as it is now: the compiled model, whether it
    timed anything, the RuntimeWarnings it gave, and its outputs against the original's."""
    clock.calls = 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = compile(build(), x, formats=CANDIDATES)
    with torch.no_grad():
        error = float((compiled(x) - build()(x)).abs().max())
    return compiled, clock.calls > 0, [str(w.message) for w in caught
                                       if issubclass(w.category, RuntimeWarning)], error


@pytest.mark.parametrize("layer", ["conv", "linear"])
def test_a_cache_record_splitting_a_layer_that_cannot_split_is_ignored(cache_dir, layer):
    """A record giving a conv layer a second format for larger row counts made compile
    build a CompiledLinear in place of the conv (its forward then failed: "x must have
    shape (..., in_features=36)"); only a Linear layer holds two formats, and its record
    is still read as it is."""
    directory, clock = cache_dir
    build, x = ((_conv_model, torch.randn(2, 4, 8, 8)) if layer == "conv"
                else (_linear_model, torch.randn(4, 32)))
    compile(build(), x, formats=CANDIDATES)
    _rewrite(directory, lambda d: d["choice"].update(format_large="dense",
                                                      split=d["key"]["rows"][0]))
    compiled, timed, warned, error = _compile_again(build, x, clock)
    assert error < 1e-5
    larges = {c.get("format_large") for c in compiled.sparsekit_choices.values()}
    if layer == "linear":
        assert not timed and not warned and larges == {"dense"}
        return
    assert timed and larges == {None}
    assert any(re.search("ignoring corrupt decision cache file.*format_large", w)
               for w in warned)


def test_a_cache_record_with_a_split_that_is_no_row_count_is_ignored(cache_dir):
    """split=true (JSON) equals the row count 1 in Python, so it passed as one and compile
    failed with "split must be an int ≥ 1, got True"."""
    directory, clock = cache_dir
    compile(_linear_model(), torch.randn(4, 32), formats=CANDIDATES)
    _rewrite(directory, lambda d: d["choice"].update(format_large="dense", split=True))
    compiled, timed, warned, error = _compile_again(_linear_model, torch.randn(4, 32), clock)
    assert timed and error < 1e-5
    assert any("ignoring corrupt decision cache file" in w and "split True" in w for w in warned)


@pytest.mark.parametrize("where, value", [
    ("ms_dense", math.nan), ("speedup", math.inf), ("times_ms", -1.0), ("times_ms", math.nan),
    ("spread", math.nan), ("spread", -0.5), ("ms_dense", "1.5"), ("times_ms", "0.2"),
    ("spread", True),
])
def test_a_cache_record_with_times_no_timing_gives_is_ignored(cache_dir, where, value):
    """json.loads reads NaN and Infinity: a record claiming NaN or negative times was read
    as a valid decision (the report showed speedup nan; a NaN spread made a close call
    look clear, so it was never timed again); strings and booleans were read as times."""
    directory, clock = cache_dir
    compile(_linear_model(), torch.randn(4, 32), formats=CANDIDATES)

    def damage(data):
        choice = data["choice"]
        if where == "times_ms":
            choice["times_ms"]["dense"]["1"] = value
        elif where == "spread":
            choice["evidence"]["1"]["spread"] = value
        else:
            choice[where] = value

    _rewrite(directory, damage)
    compiled, timed, warned, _ = _compile_again(_linear_model, torch.randn(4, 32), clock)
    assert timed
    assert any("ignoring corrupt decision cache file" in w and "finite" in w for w in warned)
    for choice in compiled.sparsekit_choices.values():
        assert math.isfinite(choice["speedup"]) and math.isfinite(choice["ms_dense"])


def _replace_files(directory, make) -> list:
    paths = sorted(directory.glob("*.json"))
    assert paths
    for path in paths:
        path.unlink()
        make(path)
    return paths


def _in_thread(fn, timeout: float = 60.0):
    """Run ``fn`` in a daemon thread; what it returned, or fail if it is still running
    after ``timeout`` seconds (a read that blocks forever)."""
    result: dict[str, object] = {}

    def run():
        try:
            result["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            result["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), "the decision cache read never returned"
    if "error" in result:
        raise result["error"]
    return result["value"]


@pytest.mark.parametrize("kind", ["fifo", "huge", "directory", "/dev/zero"])
def test_a_cache_file_that_is_no_regular_file_or_too_large_is_ignored(cache_dir, kind):
    """A decision file replaced by a symlink to /dev/zero was read until memory ran out
    (the process was OOM-killed at 22 GB), a FIFO blocked compile forever, and a valid
    record padded to over a megabyte was read whole and used; each is now a corrupt file
    (warned, timed again, and replaced by the next store). The FIFO runs first: a read
    that blocks fails that case after a minute instead of filling the memory."""
    directory, clock = cache_dir
    compile(_linear_model(), torch.randn(4, 32), formats=CANDIDATES)
    if kind == "/dev/zero" and not os.path.exists("/dev/zero"):
        pytest.skip("no /dev/zero")
    if kind == "fifo" and not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs here")
    records = {p: p.read_bytes() for p in directory.glob("*.json")}
    makers = {
        "/dev/zero": lambda p: p.symlink_to("/dev/zero"),
        "fifo": lambda p: os.mkfifo(p),
        "huge": lambda p: p.write_bytes(records[p] + b" " * decisions._MAX_BYTES),
        "directory": lambda p: p.mkdir(),
    }
    paths = _replace_files(directory, makers[kind])
    compiled, timed, warned, error = _in_thread(
        lambda: _compile_again(_linear_model, torch.randn(4, 32), clock))
    assert timed and error < 1e-5
    assert {c["format"] for c in compiled.sparsekit_choices.values()} == {"torch_csr"}
    assert any(re.search(r"(corrupt|cannot read) decision cache file", w) for w in warned)
    if kind != "directory":  # the next store replaced it by a regular file of the decision
        assert all(p.is_file() and not p.is_symlink() and "choice" in json.loads(p.read_text())
                   for p in paths)


# -- the training integrations --------------------------------------------------------------


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def _hooks(optimizer: torch.optim.Optimizer) -> tuple[int, int]:
    return len(optimizer._optimizer_step_pre_hooks), len(optimizer._optimizer_step_post_hooks)


def _dynamic(model: nn.Module, optimizer: torch.optim.Optimizer) -> DynamicSparsity:
    return DynamicSparsity(model, optimizer, 0.5, method="rigl", every=1, end_step=10,
                           allocation="uniform")


def test_a_refused_state_leaves_no_hooks_of_the_schedule_the_function_built():
    """attach(function, state=...) built the schedule, whose constructor hooks the
    optimizer, and then refused the state: the ValueError left that schedule's hooks on
    the optimizer (two pre-step hooks, one post-step hook). An HF Trainer keeps its
    optimizer across train() calls, so the next train() ran two schedules' masks at once;
    the optimizer is now left with the hooks it had."""
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    own = optimizer.register_step_post_hook(lambda *_: None)  # the user's, kept
    before = _hooks(optimizer)
    with pytest.raises(ValueError, match="state is no state of this DynamicSparsity"):
        training.attach(_dynamic, model, optimizer, state={"masks": {"nothere": torch.ones(2)}})
    assert _hooks(optimizer) == before
    attached = training.attach(_dynamic, model, optimizer)  # and a later attach works alone
    assert _hooks(optimizer) == (before[0] + 2, before[1] + 2)
    attached.remove()
    own.remove()


def test_hf_resume_with_a_bad_state_file_leaves_no_hooks_of_a_built_schedule(tmp_path):
    """The same through SparsityCallback(lambda model, opt: DynamicSparsity(...)), the
    documented way to use DynamicSparsity in a Trainer."""
    pytest.importorskip("transformers")
    from sparsekit.integrations.hf import STATE_FILE, SparsityCallback

    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    saved = tmp_path / "checkpoint-5" / STATE_FILE
    saved.parent.mkdir()
    torch.save({"step": 1}, saved)
    callback = SparsityCallback(_dynamic)
    with pytest.raises(ValueError, match=rf"{re.escape(str(saved))} is no state"):
        callback.on_train_begin(types.SimpleNamespace(output_dir=str(tmp_path)),
                                types.SimpleNamespace(global_step=5), None,
                                model=model, optimizer=optimizer)
    assert callback.attached is None and _hooks(optimizer) == (0, 0)


def test_hf_resume_without_a_state_file_warns_that_the_schedule_starts_over(tmp_path):
    """Resuming at step 5 from a checkpoint directory without sparsekit_state.pt (one saved
    by another node, or resume_from_checkpoint= outside output_dir, where the callback does
    not look) silently started the schedule from its first step; it now says so."""
    pytest.importorskip("transformers")
    from sparsekit.integrations.hf import STATE_FILE, SparsityCallback

    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    gradual = GradualPruner(model, 0.5, start_step=0, end_step=10, every=1)
    callback = SparsityCallback(gradual)
    where = re.escape(str(tmp_path / "checkpoint-5" / STATE_FILE))
    with pytest.warns(RuntimeWarning, match=rf"resuming at step 5 without {where}.*from its "
                                            "first step"):
        callback.on_train_begin(types.SimpleNamespace(output_dir=str(tmp_path)),
                                types.SimpleNamespace(global_step=5), None,
                                model=model, optimizer=optimizer)
    assert callback.schedule is gradual and gradual.step_count == 0
    callback.on_train_end(None, None, None)
    with warnings.catch_warnings():  # a fresh run (step 0) has no state to miss
        warnings.simplefilter("error")
        callback.on_train_begin(types.SimpleNamespace(output_dir=str(tmp_path)),
                                types.SimpleNamespace(global_step=0), None,
                                model=model, optimizer=optimizer)
    callback.on_train_end(None, None, None)


@pytest.mark.parametrize("call", ["attach", "function", "callback", "accelerate"])
def test_arguments_of_the_wrong_type_are_argument_type_errors(call):
    """They were plain TypeErrors, which the documented `except ValueError` does not catch."""
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    calls = {
        "attach": lambda: training.attach(0.5, model, optimizer),
        "function": lambda: training.attach(lambda m, o: "rigl", model, optimizer),
        "callback": lambda: training.TrainingSparsity(None),
        "accelerate": lambda: _accelerate_attach(None, sparsekit.prune(model, 0.5), model,
                                                 optimizer),
    }
    with pytest.raises(ValueError) as caught:
        calls[call]()
    assert isinstance(caught.value, ArgumentTypeError)
    assert re.search(r"sparsity|accelerator", str(caught.value))
    assert _hooks(optimizer) == (0, 0)


def _accelerate_attach(*args):
    pytest.importorskip("accelerate")
    from sparsekit.integrations.accelerate import attach

    return attach(*args)


# -- the plain training loop ----------------------------------------------------------------


def _classifier() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


def _epoch_data(n: int = 12, x=None, y=None) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 8, generator=g) if x is None else x,
                         torch.randint(0, 4, (n,), generator=g) if y is None else y)


def _nan_inputs() -> TensorDataset:
    x = torch.randn(12, 8)
    x[11, 3] = math.nan
    return _epoch_data(x=x)


@pytest.mark.parametrize("case, error, match", [
    ("on_step", TypeError, r"^on_step must be None or a function called after each step, "
                           r"got int$"),
    ("empty", ValueError, r"^data holds no examples; train_epoch needs at least one$"),
    ("nan inputs", ValueError, r"^data's inputs hold 1 non-finite value \(NaN or inf\)"),
    ("label too large", ValueError, r"^data: labels must be class indices in \[0, 4\) "
                                    r"\(or -100, ignored\) for the model's 4 outputs, got 4"),
    ("negative label", ValueError, r"^data: labels must be class indices .* got -1"),
    ("wrong width", ValueError, r"^data: the model cannot train on its examples: mat1 and mat2"),
])
def test_train_epoch_refuses_what_failed_or_gave_garbage_only_after_training_began(
        case, error, match):
    """on_step=5 was a TypeError after the first optimizer step; a label too large in the
    last batch an IndexError ('Target 4 is out of bounds') after all the others had
    trained; NaN inputs turned every weight NaN and returned loss nan; no examples at all
    returned a mean loss of 0.0. Each is now refused before anything changes."""
    from sparsekit.training import train_epoch

    kwargs = {"on_step": 5} if case == "on_step" else {}
    labels = torch.randint(0, 4, (12,), generator=torch.Generator().manual_seed(0))
    data = {
        "on_step": lambda: _epoch_data(),
        "empty": lambda: _epoch_data(0),
        "nan inputs": _nan_inputs,
        "label too large": lambda: _epoch_data(y=torch.cat([labels[:11], torch.tensor([4])])),
        "negative label": lambda: _epoch_data(y=torch.cat([labels[:11], torch.tensor([-1])])),
        "wrong width": lambda: _epoch_data(x=torch.randn(12, 5)),
    }[case]()
    model = _classifier()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    with pytest.raises(error, match=match):
        train_epoch(model, data, optimizer, batch_size=4, **kwargs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model.training and not optimizer.state


def test_train_epoch_takes_ignored_labels_and_class_probabilities():
    """What cross_entropy takes still trains: -100 (ignored) among the labels, and float
    targets of one probability per class."""
    from sparsekit.training import train_epoch

    labels = torch.randint(0, 4, (12,))
    labels[0] = -100
    model = _classifier()
    assert math.isfinite(train_epoch(model, _epoch_data(y=labels), torch.optim.SGD(
        model.parameters(), lr=0.1), batch_size=4))
    model = _classifier()
    soft = torch.softmax(torch.randn(12, 4), dim=1)
    assert math.isfinite(train_epoch(model, _epoch_data(y=soft),
                                     torch.optim.SGD(model.parameters(), lr=0.1)))


def test_accuracy_refuses_non_finite_inputs():
    """A NaN input made its prediction the argmax of NaN logits: an accuracy that counts
    garbage."""
    from sparsekit.training import accuracy

    with pytest.raises(ValueError, match=r"^data's inputs hold 1 non-finite value"):
        accuracy(_classifier(), _nan_inputs())


# -- distributed ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex64])
def test_the_rank_fingerprint_tells_apart_tensors_that_float32_or_the_real_part_cannot(dtype):
    """check_same_on_ranks compares fingerprints: float64 tensors were read as float32 bits
    (1.0 and 1.0 + 1e-12 agreed) and complex ones by their real part only (with a
    ComplexWarning), so weights that differ between ranks passed as the same."""
    from sparsekit.distributed import _fingerprint

    one = torch.ones(3, dtype=dtype)
    other = one.clone()
    other[1] += 1e-12 if dtype == torch.float64 else 1j
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not torch.equal(_fingerprint(one), _fingerprint(other))
        assert torch.equal(_fingerprint(one), _fingerprint(one.clone()))


@pytest.mark.parametrize("batch_size", [4, 1000])
def test_accuracy_refuses_labels_that_are_no_class_indices(batch_size):
    """One-hot labels were compared with the predictions by broadcasting: a batch of as many
    rows as classes gave a made-up accuracy (0.33 here), any other a bare RuntimeError
    ("The size of tensor a (12) must match the size of tensor b (4)")."""
    from sparsekit.training import accuracy

    one_hot = nn.functional.one_hot(torch.randint(0, 4, (12,)), 4)
    with pytest.raises(ValueError, match=r"^data's labels must be class indices \(one per "
                                         r"example\), got a tensor of shape \(12, 4\)"):
        accuracy(_classifier(), _epoch_data(y=one_hot), batch_size=batch_size)


def test_hf_a_damaged_state_file_is_a_value_error_naming_it(tmp_path):
    """A checkpoint's sparsekit_state.pt with flipped bytes or cut short failed in
    torch.load's unpickler with a raw UnicodeDecodeError, KeyError, IndexError or
    AssertionError that named no file; every damaged copy now either loads or is the
    ValueError naming the file that a file of the wrong kind already was."""
    pytest.importorskip("transformers")
    import random

    from sparsekit.integrations.hf import _read_state

    gradual = GradualPruner(_model(), 0.5, start_step=0, end_step=4, every=1)
    path = tmp_path / "sparsekit_state.pt"
    torch.save(gradual.state_dict(), path)
    good = path.read_bytes()
    rng = random.Random(0)
    for i in range(400):
        damaged = bytearray(good)
        if i % 2:
            damaged = damaged[: rng.randrange(len(damaged))]
        else:
            for _ in range(rng.randrange(1, 8)):
                damaged[rng.randrange(len(damaged))] = rng.randrange(256)
        path.write_bytes(bytes(damaged))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about some damaged archives
            try:
                _read_state(path)
            except ValueError as err:
                assert f"{path} is no state saved by SparsityCallback" in str(err), (i, err)
