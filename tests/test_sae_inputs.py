"""sparsekit.sae on hostile input: every bad value fails with an error naming the parameter,
before the SAE's weights, its mode, an optimizer or a directory on disk has changed."""

import contextlib
import json

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sparsekit._checks import ArgumentTypeError
from sparsekit.sae import SAE, load, metrics, objective, save, train
from sparsekit.sae import files as sae_files

pytestmark = pytest.mark.usefixtures("one_thread")

NAN, INF = float("nan"), float("inf")


def _state(sae):
    return {n: t.detach().clone() for n, t in sae.state_dict().items()}


@contextlib.contextmanager
def unchanged(sae):
    """Assert that ``sae``'s state dict and train/eval mode are the same after the block."""
    state, training = _state(sae), sae.training
    yield
    assert sae.training == training
    after = _state(sae)
    assert after.keys() == state.keys()
    assert all(torch.equal(after[n], t) for n, t in state.items())


def _fresh():
    return SAE(8, 16, k=2, init_norm=0.1).eval()  # un-normalised rows: a renorm would show


# -- train: the data --------------------------------------------------------------------

@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_train_refuses_non_finite_activations_before_any_step(bad):
    sae = _fresh()
    x = torch.randn(64, 8)
    x[3, 2] = bad
    with unchanged(sae), pytest.raises(ValueError, match=r"activations batch 0 must be "
                                                          r"finite, got 1 NaN or inf"):
        train(sae, x, batch_size=16)


def test_train_names_the_bad_batch_of_a_stream_after_training_on_the_good_ones():
    sae = _fresh()
    bad = torch.randn(16, 8)
    bad[0, 0] = NAN
    with pytest.raises(ValueError, match="activations batch 2 must be finite"):
        train(sae, [torch.randn(16, 8), torch.randn(16, 8), bad], batch_size=16)
    assert torch.isfinite(sae.W_dec).all() and not sae.training  # streamed, left in eval mode
    with pytest.raises(ValueError, match=r"activations batch 1 must have shape \(\.\.\., 8\)"):
        train(sae, iter([torch.randn(16, 8), torch.randn(4, 5)]), batch_size=16)


def test_train_refuses_a_non_finite_transcoder_target():
    sae = SAE(8, 16, "l1", d_out=4).eval()
    y = torch.randn(32, 4)
    y[-1] = INF
    with unchanged(sae), pytest.raises(ValueError, match=r"activations batch 0 \(target\) "
                                                          r"must be finite"):
        train(sae, [(torch.randn(32, 8), y)], batch_size=16)


@pytest.mark.parametrize("data", [[], torch.ones(0, 8), [torch.ones(0, 8)]],
                         ids=["empty-list", "empty-tensor", "list-of-empty"])
@pytest.mark.parametrize("steps", [None, 2])
def test_train_without_rows_fails_before_renormalising(data, steps):
    """With ``steps`` a list of empty items is passed over again for more rows: it once
    did so forever (each pass saw items, none of them a row)."""
    sae = _fresh()
    with unchanged(sae), pytest.raises(ValueError, match="activations must hold at least one "
                                                          "row, got none"):
        train(sae, data, batch_size=16, steps=steps)


# -- train: the arguments ---------------------------------------------------------------

@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"optimizer": "abc"}, ArgumentTypeError, "optimizer must be a torch.optim.Optimizer"),
    ({"optimizer": torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=1.0)}, ValueError,
     "optimizer must be over sae's parameters"),
    ({"decay": True}, ArgumentTypeError, r"decay must be a float in \[0, 1\], got True"),
    ({"decay": 1.5}, ValueError, r"decay must be in \[0, 1\], got 1.5"),
    ({"lr": NAN}, ValueError, "lr must be a finite float ≥ 0, got nan"),
    ({"lr": "1e-3"}, ArgumentTypeError, "lr must be a finite float ≥ 0, got '1e-3'"),
    ({"sparsity_coef": -1.0}, ValueError, "sparsity_coef must be a finite float ≥ 0"),
    ({"aux_coef": True}, ArgumentTypeError, "aux_coef must be a finite float ≥ 0, got True"),
    ({"steps": 2.0}, ArgumentTypeError, "steps must be an int ≥ 1, got 2.0"),
    ({"steps": True}, ArgumentTypeError, "steps must be an int ≥ 1, got True"),
    ({"batch_size": 0}, ValueError, "batch_size must be an int ≥ 1, got 0"),
    ({"clip_grad_norm": INF}, ValueError, "clip_grad_norm must be a positive finite float"),
])
def test_train_refuses_bad_arguments_before_touching_the_sae(kwargs, error, match):
    sae = _fresh()
    with unchanged(sae), pytest.raises(error, match=match):
        train(sae, torch.randn(64, 8), batch_size=kwargs.pop("batch_size", 16), **kwargs)


def test_train_leaves_the_optimizer_alone_when_the_data_is_bad():
    sae = _fresh()
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-3)
    groups = [dict(g) for g in optimizer.param_groups]
    with unchanged(sae), pytest.raises(ValueError, match="activations batch 0"):
        train(sae, torch.full((4, 8), NAN), optimizer=optimizer, steps=10)
    assert [dict(g) for g in optimizer.param_groups] == groups  # no scheduler attached
    assert not optimizer.state


def test_a_vanishing_decay_does_not_divide_by_zero():
    out = train(SAE(8, 16, k=2), torch.randn(64, 8), batch_size=16, steps=4, decay=1e-17)
    assert out["steps"] == 4


# -- metrics and objective --------------------------------------------------------------

def test_metrics_refuses_non_finite_activations_and_restores_the_mode():
    sae = SAE(8, 16, k=2).train()
    x = torch.randn(8, 8)
    x[1, 1] = NAN
    with unchanged(sae), pytest.raises(ValueError, match="activations batch 1 must be finite"):
        metrics(sae, [torch.randn(8, 8), x])


@pytest.mark.parametrize("data", [torch.ones(4, 8), torch.full((100, 8), 0.1),
                                  torch.randn(1, 8)], ids=["ones", "tenths", "one-row"])
def test_metrics_on_data_without_variance_raises_instead_of_a_nan_fvu(data):
    with pytest.raises(ValueError, match="activations must vary: the fvu divides by their "
                                         "variance"):
        metrics(SAE(8, 16, k=2), data)


def test_metrics_of_varying_data_is_finite():
    assert 0 <= metrics(SAE(8, 16, k=2), torch.randn(32, 8))["fvu"] < float("inf")


@pytest.mark.parametrize(("x", "target", "match"), [
    (torch.full((4, 8), NAN), None, "x must be finite, got 32 NaN or inf among 32"),
    (torch.randn(4, 8), torch.full((4, 8), INF), "target must be finite"),
    (torch.randn(4, 8), torch.ones(4, 3), r"target must have shape \(\.\.\., 8\), got shape "
                                          r"\(4, 3\)"),
    (torch.randn(4, 8), torch.ones(5, 8), r"target must have shape \(4, 8\) \(x's rows\)"),
    (torch.randn(4, 7), None, r"x must have shape \(\.\.\., 8\)"),
])
def test_objective_refuses_bad_batches_before_recording_firing(x, target, match):
    sae = SAE(8, 16, k=2).train()  # training mode: the objective would count firings
    with unchanged(sae), pytest.raises(ValueError, match=match):
        objective(sae, x, target)


def test_objective_of_a_transcoder_needs_its_target():
    with pytest.raises(ValueError, match=r"target must be given for a transcoder \(d_out=4"):
        objective(SAE(8, 16, "l1", d_out=4), torch.randn(4, 8))


# -- the constructor --------------------------------------------------------------------

@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"transcoder": "no"}, ArgumentTypeError,
     r"transcoder must be a bool \(True or False\), got 'no'"),
    ({"normalize_decoder": "no"}, ArgumentTypeError,
     r"normalize_decoder must be a bool \(True or False\), got 'no'"),
    ({"normalize_decoder": 1}, ArgumentTypeError,
     r"normalize_decoder must be a bool \(True or False\), got 1"),
    ({"matryoshka": 5}, ArgumentTypeError, "matryoshka must be a sequence of increasing"),
    ({"matryoshka": "16"}, ArgumentTypeError, "matryoshka must be a sequence"),
    ({"dtype": torch.int64}, ArgumentTypeError, "dtype must be a floating-point torch.dtype "
                                                "or None, got torch.int64"),
    ({"dtype": torch.bool}, ArgumentTypeError, "dtype must be a floating-point"),
    ({"dtype": "float32"}, ArgumentTypeError, "dtype must be a floating-point"),
    ({"device": "nope"}, ValueError, "device 'nope' is not available here"),
    ({"device": 1.5}, ArgumentTypeError, "device must be None, a str, an int or a "
                                         "torch.device, got 1.5"),
    ({"seed": 1.5}, ArgumentTypeError, "seed must be an int, got 1.5"),
    ({"seed": True}, ArgumentTypeError, "seed must be an int, got True"),
    ({"seed": "x"}, ArgumentTypeError, "seed must be an int, got 'x'"),
])
def test_constructor_refuses_bad_arguments_naming_them(kwargs, error, match):
    with pytest.raises(error, match=match):
        SAE(8, 16, k=2, **kwargs)


def test_constructor_takes_good_dtypes_devices_and_seeds():
    sae = SAE(8, 16, k=2, dtype=torch.float64, device=torch.device("cpu"), seed=-3)
    assert sae.W_dec.dtype == torch.float64 and sae.W_dec.device.type == "cpu"
    assert SAE(8, 16, k=2, device="meta").W_enc.is_meta


# -- decoding and firing ----------------------------------------------------------------

@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "autograd"])
@pytest.mark.parametrize(("indices", "error", "match"), [
    (torch.tensor([[0, 99], [1, 2]]), ValueError,
     r"indices must lie in \[0, n_latents=16\), got values from 0 to 99"),
    (torch.tensor([[0, -1], [1, 2]]), ValueError, "indices must lie in .* from -1 to 2"),
    (torch.tensor([[0.0, 1.7], [1.0, 2.0]]), ArgumentTypeError,
     "indices must be an integer tensor, got torch.float32"),
    (torch.ones(2, 2, dtype=torch.bool), ArgumentTypeError, "indices must be an integer"),
    ([[0, 1], [1, 2]], ArgumentTypeError, "indices must be a tensor, got list"),
    (torch.tensor([0, 1]), ValueError, "values and indices must have one shape"),
])
def test_decode_sparse_refuses_bad_indices_alike_with_and_without_autograd(
        grad, indices, error, match):
    sae = SAE(8, 16, k=2)
    with torch.set_grad_enabled(grad), pytest.raises(error, match=match):
        sae.decode_sparse(torch.ones(2, 2), indices)


def test_record_firing_refuses_out_of_range_indices_before_counting():
    sae = SAE(8, 16, "batchtopk", k=2).train()
    with unchanged(sae), pytest.raises(ValueError, match=r"indices must lie in \[0, "
                                                          r"n_latents=16\)"):
        sae.record_firing(torch.ones(2, 2), torch.tensor([[0, 99], [1, 2]]))
    with unchanged(sae), pytest.raises(ArgumentTypeError, match="indices must be an integer"):
        sae.record_firing(torch.ones(2, 2), torch.ones(2, 2))


# -- save and load ----------------------------------------------------------------------

def _saved(tmp_path, activation="topk"):
    sae = SAE(8, 16, activation, k=2, seed=3)
    save(sae, tmp_path)
    return sae, json.loads((tmp_path / "cfg.json").read_text())


def _edit_cfg(tmp_path, edit):
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    edit(cfg)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize(("edit", "match"), [
    (lambda c: c.pop("d_in"), r"cfg.json: no d_in \(the SAE's widths\)"),
    (lambda c: c.update(d_in="8"), "cfg.json: not a loadable SAE config: d_in must be an int"),
    (lambda c: c.update(dtype="int8"), "cfg.json: dtype 'int8' is not supported; accepted: "
                                       "float32"),
    (lambda c: c.update(sparsekit="x"), "cfg.json: sparsekit must be an object, got 'x'"),
    (lambda c: c["sparsekit"].update(normalize_decoder="yes"),
     "cfg.json: not a loadable SAE config: normalize_decoder must be a bool"),
    (lambda c: c.update(k=1000) or c["sparsekit"].update(k=1000),
     r"cfg.json: not a loadable SAE config: k must be an int in \[1, n_latents=16\]"),
    (lambda c: c.update(architecture="gated"), "cfg.json: architecture 'gated' is not "
                                               "supported"),
    (lambda c: c.update(d_in=5), r"sae_weights.safetensors: W_enc has shape \(8, 16\), but "
                                 r"cfg.json describes \(5, 16\)"),
])
def test_load_names_the_file_and_the_fault_of_a_damaged_config(tmp_path, edit, match):
    _saved(tmp_path)
    _edit_cfg(tmp_path, edit)
    with pytest.raises(ValueError, match=match):
        load(tmp_path)


def test_load_keeps_the_cause_of_unreadable_files(tmp_path):
    _saved(tmp_path)
    (tmp_path / "cfg.json").write_text("{not json")
    with pytest.raises(ValueError, match="cfg.json: not valid JSON") as err:
        load(tmp_path)
    assert isinstance(err.value.__cause__, json.JSONDecodeError)
    _saved(tmp_path)
    (tmp_path / "cfg.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="cfg.json: must hold a JSON object, got list"):
        load(tmp_path)
    _saved(tmp_path)
    (tmp_path / "sae_weights.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="sae_weights.safetensors: not a safetensors file") \
            as err:
        load(tmp_path)
    assert isinstance(err.value.__cause__, SafetensorError)


@pytest.mark.parametrize(("activation", "drop"), [("topk", "b_dec"), ("jumprelu", "threshold")])
def test_load_names_a_missing_tensor(tmp_path, activation, drop):
    _saved(tmp_path, activation)
    weights = load_file(tmp_path / "sae_weights.safetensors")
    del weights[drop]
    save_file(weights, tmp_path / "sae_weights.safetensors")
    with pytest.raises(ValueError, match=f"sae_weights.safetensors: no tensor {drop} "):
        load(tmp_path)


def test_load_names_a_tensor_of_the_wrong_shape(tmp_path):
    _saved(tmp_path, "jumprelu")
    weights = load_file(tmp_path / "sae_weights.safetensors")
    weights["threshold"] = torch.ones(3)
    save_file(weights, tmp_path / "sae_weights.safetensors")
    with pytest.raises(ValueError, match=r"threshold has shape \(3,\), but cfg.json describes "
                                         r"\(16,\)"):
        load(tmp_path)


def test_save_and_load_refuse_a_path_that_is_not_one(tmp_path):
    sae = SAE(8, 16, k=2)
    for call in (lambda: save(sae, None), lambda: load(None), lambda: save(sae, 3)):
        with pytest.raises(ArgumentTypeError, match="path must be a str or os.PathLike"):
            call()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="path must be a directory .* got the file"):
        save(sae, tmp_path / "file")


def test_save_refuses_metadata_json_cannot_hold_before_writing(tmp_path):
    with pytest.raises(ArgumentTypeError, match="metadata must hold only JSON values"):
        save(SAE(8, 16, k=2), tmp_path / "new", metadata={"when": object()})
    assert not (tmp_path / "new").exists()


def _same_files(tmp_path, before):
    return {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


@pytest.mark.parametrize("failing", ["weights", "config"])
def test_a_failed_save_leaves_the_old_sae_loadable_and_no_temporary_files(
        tmp_path, monkeypatch, failing):
    old, _ = _saved(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def half_written(tmp):
        tmp.write_bytes(b"half")
        raise OSError("disk full")

    if failing == "weights":
        monkeypatch.setattr(sae_files, "save_file", lambda weights, tmp: half_written(tmp))
    else:
        monkeypatch.setattr(sae_files.Path, "write_text", lambda tmp, text: half_written(tmp))
    with pytest.raises(OSError, match="disk full"):
        save(SAE(8, 16, k=2, seed=4), tmp_path)
    monkeypatch.undo()
    assert _same_files(tmp_path, before)
    assert torch.equal(load(tmp_path).W_dec, old.W_dec)


def test_a_save_interrupted_between_its_renames_leaves_no_config_load_would_accept(
        tmp_path, monkeypatch):
    _saved(tmp_path)
    renames = []

    def replace(src, dst):
        if renames:
            raise KeyboardInterrupt
        renames.append(dst)
        return real(src, dst)

    real = sae_files.os.replace
    monkeypatch.setattr(sae_files.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        save(SAE(8, 32, k=2, seed=4), tmp_path)  # new weights renamed, the config not yet
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError, match="no cfg.json"):
        load(tmp_path)
