"""Hostile inputs, round 17 (odds and ends):

- ``moe.LowRankRouter`` with an ``act`` that is no callable (e.g. the string ``"relu"``) was
  built, and every forward failed with ``'str' object is not callable``;
- a NumPy int ``seed`` passes ``check_seed``, but ``torch.Generator.manual_seed`` takes
  Python ints only: ``sparsekit.prune(method="random", seed=np.int64(5))`` and the other
  seeded draws (calibration, SAE, MoEfication) failed with a raw ``TypeError``;
- ``sparsekit.save(model, "x/")`` (or ``"x/."``) wrote a file named ``x`` (pathlib reads
  both as the file ``x``), and a path holding a NUL failed only in the final write;
- ``python -m sparsekit`` failed: the package had no ``__main__``;
- the dense format's ``matmul`` of an ``x`` of another dtype than its weight was
  ``F.linear``'s raw ``RuntimeError`` (the other formats name ``x``);
- JSON nested some thousand levels deep — in a resealed checkpoint's ``tensors`` entry, a
  ``save_pretrained`` directory's ``config.json`` — was a ``RecursionError`` traceback, not
  the ``ValueError`` naming the file that other malformed JSON gives;
- ``llm.calibration_tokens`` (``llm-prune --nsamples 1000000000000``) asked the allocator
  for terabytes of windows: a raw ``RuntimeError`` after the model had loaded;
- ``DynamicSparsity(every=100, end_step=10)`` (the default ``every`` with a short run)
  never changed its masks, silently: it warns;
- a format built under ``torch.inference_mode`` (``CompiledLinear.from_linear(layer,
  "torch_csr")`` there) failed at its first product reading its buffers' version counter,
  which inference tensors do not keep;
- ``compile`` replaced layers that had forward hooks by compiled layers that do not run
  them, silently (a hook recording a layer's outputs recorded nothing); it warns, at the
  caller's line (as does its warning about forced formats, whose ``stacklevel`` pointed
  into the library once ``compile`` gained its ``inference_mode`` wrapper).
"""

from __future__ import annotations

import pytest
import torch

from sparsekit.moe import LowRankRouter


def test_a_low_rank_router_refuses_an_activation_that_is_no_callable():
    with pytest.raises(TypeError, match=r"act must be the FFN's activation, a callable such as "
                                        r"torch.relu, got 'relu'"):
        LowRankRouter(torch.randn(8, 1, 4), None, torch.ones(8), "relu", torch.randn(16, 4),
                      rank=2, unit_size=2)


def test_numpy_int_seeds_draw_what_python_ints_draw():
    """``check_seed`` accepts any integral seed; the generators took Python ints only (a raw
    ``TypeError: an integer is required`` from ``sparsekit.prune(method="random")`` and
    every other seeded draw)."""
    import numpy as np

    import sparsekit

    def pruned(seed):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 8))
        sparsekit.prune(model, sparsity=0.5, method="random", seed=seed)
        return model[0].weight.detach().clone()

    assert torch.equal(pruned(np.int64(5)), pruned(5))


@pytest.mark.parametrize("name", ["x/", "x/.", "x\0y"])
def test_save_refuses_a_path_that_names_no_file(tmp_path, name):
    """``Path("x/")`` and ``Path("x/.")`` are the file ``x``: ``sparsekit.save("x/")`` wrote
    a file named ``x``; a NUL failed only in the final write."""
    import sparsekit

    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"path must be the path of the checkpoint file"):
        sparsekit.save(model, f"{tmp_path}/{name}")  # not tmp_path / name: "x/" would be x
    assert list(tmp_path.iterdir()) == []


def test_python_m_sparsekit_runs_the_command():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "sparsekit", "--help"], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and "usage: sparsekit" in done.stdout


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_the_dense_format_names_an_x_of_another_dtype(dtype):
    from sparsekit._checks import ArgumentTypeError
    from sparsekit.engine.formats import FORMATS

    fmt = FORMATS["dense"].from_dense(torch.randn(3, 4))
    with pytest.raises(ArgumentTypeError, match=r"x must have the weight's dtype torch.float32 "
                                                 r"for this 3x4 dense weight, got " + str(dtype)):
        fmt.matmul(torch.randn(2, 4, dtype=dtype))


_DEEP = "[" * 100_000 + "]" * 100_000


def test_a_resealed_header_nested_too_deeply_is_refused_by_name(tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    from sparsekit import checkpoint

    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    path = checkpoint.save(model, tmp_path / "m.safetensors")
    meta = checkpoint.read_metadata(path)
    for key in ("tensors", "tied"):
        bad = dict(meta, **{key: _DEEP})
        bad["digest"] = checkpoint._header_digest(bad)
        save_file(load_file(path), tmp_path / "bad.safetensors", metadata=bad)
        before = model.state_dict()["0.weight"].clone()
        with pytest.raises(ValueError, match=f"'{key}' in the header is not valid JSON"):
            checkpoint.load(model, tmp_path / "bad.safetensors")
        assert torch.equal(model.state_dict()["0.weight"], before)
    assert json.loads(meta["tensors"])  # the intact file's entry parses


def test_a_config_nested_too_deeply_is_refused_by_name(tmp_path):
    from sparsekit.pretrained import from_pretrained

    (tmp_path / "config.json").write_text(_DEEP)
    with pytest.raises(ValueError, match=r"config.json: not a JSON object"):
        from_pretrained(tmp_path)


def test_calibration_windows_beyond_memory_are_refused_by_name():
    from sparsekit.llm.calibration import calibration_tokens

    stream = torch.arange(1000)
    with pytest.raises(ValueError, match=r"nsamples=1000000000000 windows of 128 tokens take "
                                         r"1,024,000,000,000,000 bytes, more than this "
                                         r"machine's memory"):
        calibration_tokens(stream, nsamples=10**12, seqlen=128)
    assert calibration_tokens(stream, nsamples=3, seqlen=128).shape == (3, 128)


def test_dynamic_sparsity_warns_when_it_would_never_update():
    import warnings

    from sparsekit.schedules import DynamicSparsity

    def build(every):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 8))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        return DynamicSparsity(model, opt, sparsity=0.5, every=every, end_step=10)

    with pytest.warns(UserWarning, match=r"every=100 is not below end_step=10: DynamicSparsity "
                                         r"will never change its masks") as caught:
        build(100)
    assert caught[0].filename == __file__  # the caller's line, not the library's
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build(5)


def test_a_format_built_under_inference_mode_multiplies():
    from sparsekit.engine import CompiledLinear

    layer = torch.nn.Linear(16, 8)
    with torch.no_grad():
        layer.weight.mul_(torch.rand(8, 16) < 0.3)
    x = torch.randn(3, 16)
    with torch.inference_mode():
        compiled = CompiledLinear.from_linear(layer, "torch_csr")
        y = compiled(x)
        torch.testing.assert_close(y, layer(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(compiled(x), y)  # built again, the same


def test_compile_warns_of_the_forward_hooks_of_layers_it_replaces():
    import warnings

    import sparsekit

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    with torch.no_grad():
        model[0].weight.mul_(torch.rand(64, 64) < 0.1)
    seen = []
    model[0].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    x = torch.randn(4, 64)
    with pytest.warns(UserWarning, match=r"compile replaced layers \['0'\] whose forward hooks "
                                         r"the compiled layers do not run") as caught:
        compiled = sparsekit.compile(model, x, cache=False, formats=["bitmap", "dense"])
    assert caught[0].filename == __file__
    assert type(compiled[0]) is not torch.nn.Linear
    with warnings.catch_warnings():  # no hook: no warning
        warnings.simplefilter("error")
        model[0]._forward_hooks.clear()
        sparsekit.compile(model, x, cache=False, formats=["bitmap", "dense"])
