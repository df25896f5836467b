"""Hostile inputs, round 23: the CLI's flags, recipes and the training integrations.

Each case is one that gave a message naming no flag (or a raw error from deep inside),
was refused only after minutes of work, or lost a file; every refusal here leaves the
inputs and the outputs as they were.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from _cli import user_error
from torch import nn

import sparsekit
from sparsekit.integrations import attach
from sparsekit.recipe import load_recipe


@pytest.fixture
def ckpt(lenet_checkpoint) -> Path:
    return lenet_checkpoint  # conftest's dense lenet_300_100 checkpoint


@pytest.mark.parametrize(("flags", "expected"), [
    (["--sparsity", "nan"], "--sparsity must be in [0, 1), got nan"),
    (["--sparsity", "0.5", "--seed", "-1"], "--seed must be an int in [0, 2**63 - 1], got -1"),
    (["--sparsity", "0.5", "--method", "nosuch"], "--method 'nosuch' is unknown; accepted: "),
    (["--sparsity", "0.5", "--allocation", "nosuch"],
     "--allocation 'nosuch' is unknown; accepted: er, erk, global"),
    (["--sparsity", "0.5", "--pattern", "3:2"], "--pattern '3:2': "),
])
def test_prune_names_the_flag_of_a_bad_option(capsys, tmp_path, ckpt, flags, expected):
    """The library's checks ran after the checkpoint was loaded and named its parameter
    ("sparsity must be …", "seed must be …", "unknown criterion 'nosuch'"), not the flag."""
    before = ckpt.read_bytes()
    out = tmp_path / "out.safetensors"
    err = user_error(capsys, "prune", str(ckpt), "--out", str(out), *flags)
    assert expected in err
    assert not out.exists() and ckpt.read_bytes() == before


def test_diff_names_the_atol_flag(capsys, ckpt):
    err = user_error(capsys, "diff", str(ckpt), str(ckpt), "--atol", "nan")
    assert "--atol must be a finite float ≥ 0, got nan" in err


def test_llm_prune_names_the_sparsity_flag(capsys, tmp_path):
    err = user_error(capsys, "llm-prune", str(tmp_path), "--calib", "c.txt", "--out",
                     str(tmp_path / "o"), "--sparsity", "1.5")
    assert "--sparsity must be in [0, 1), got 1.5" in err


def test_llm_prune_refuses_an_unusable_device_before_loading(capsys, tmp_path):
    """--device meta (or a GPU this machine lacks) passed the command's check and was
    refused by llm.prune only after the model had been loaded and evaluated dense. The
    model directory here holds no model: the device is refused first."""
    err = user_error(capsys, "llm-prune", str(tmp_path / "model"), "--calib", "c.txt",
                     "--out", str(tmp_path / "o"), "--device", "meta")
    assert "--device: device 'meta' holds no values to calibrate on" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(("flags", "expected"), [
    (["--epochs", "0"], "--epochs must be in [1, 1000] (dense training epochs), got 0"),
    (["--epochs", "99999999999999"], "--epochs must be in [1, 1000] (dense training epochs), "
                                     "got 99999999999999"),
    (["--finetune-epochs", "-2"], "--finetune-epochs must be in [0, 1000], got -2"),
    (["--finetune-epochs", "1001"], "--finetune-epochs must be in [0, 1000], got 1001"),
    (["--sparsities", "0.5,0.9,0.50"], "--sparsities entry 3 repeats 0.5"),
])
def test_demo_names_the_bad_flag_and_its_value(capsys, tmp_path, flags, expected):
    """One message named both epoch flags and neither value; a repeated sparsity trained
    its runs twice, replaced their checkpoints and listed them twice."""
    out = tmp_path / "demo"
    err = user_error(capsys, "demo", "--out", str(out), *flags)
    assert expected in err
    assert not out.exists()


def test_a_factory_module_exiting_at_import_is_a_usage_error(capsys, tmp_path, monkeypatch,
                                                               ckpt):
    """``sys.exit()`` while the module imported ended the whole command (SystemExit out
    of ``main``) with no message."""
    (tmp_path / "sk_round23_exits.py").write_text("raise SystemExit(3)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    err = user_error(capsys, "report", str(ckpt), "--model", "sk_round23_exits:build")
    assert "--model 'sk_round23_exits:build': importing 'sk_round23_exits' exited " \
           "(SystemExit 3)" in err


def test_attach_with_a_state_names_a_model_on_the_meta_device():
    """Resuming with a function on a model not materialized yet failed copying its weights
    with a raw NotImplementedError ("Cannot copy out of meta tensor"), before the function
    ran; it now names the weight, and the function is never called."""
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    called = []
    with pytest.raises(ValueError, match=r"model: 0\.weight is on the meta device"):
        attach(lambda m, o: called.append(m), model, optimizer, state={"masks": {}})
    assert not called
    assert not optimizer._optimizer_step_pre_hooks and not optimizer._optimizer_step_post_hooks


@pytest.mark.parametrize("path", ["", "   ", "recipe\0.yaml"])
def test_load_recipe_names_an_empty_or_nul_path(path):
    """``""`` was read as the current directory ("'.' is a directory"), a NUL was a bare
    "embedded null byte"."""
    with pytest.raises(ValueError, match="path must be the path of a YAML recipe file, got"):
        load_recipe(path)


@pytest.mark.parametrize("spelling", ["link", "dotdot"])
def test_a_recipe_whose_out_is_its_checkpoint_is_refused(tmp_path, ckpt, spelling):
    """``out`` naming the checkpoint the recipe starts from (through a link, or another
    spelling of it) validated, and the run replaced that checkpoint; ``sparsekit run``
    refused it, the API and ``load_recipe`` did not."""
    start = tmp_path / "start.safetensors"
    start.write_bytes(ckpt.read_bytes())
    if spelling == "link":
        out = tmp_path / "link.safetensors"
        os.symlink(start, out)
    else:
        (tmp_path / "sub").mkdir()
        out = tmp_path / "sub" / ".." / "start.safetensors"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: lenet_300_100\ncheckpoint: {start}\nout: {out}\n")
    with pytest.raises(ValueError, match=r"out: cannot write .* it is the input checkpoint"):
        load_recipe(recipe)
    assert start.read_bytes() == ckpt.read_bytes()


@pytest.mark.parametrize("kind", ["directory", "fifo", "broken link"])
def test_hf_resume_refuses_what_lies_in_place_of_the_state_file(tmp_path, kind):
    """A directory (or a FIFO, a broken link) named sparsekit_state.pt in the checkpoint
    resumed was taken for no file: a mere warning, and the schedule restarted from its
    first step. It is now a ValueError naming it, with nothing attached."""
    pytest.importorskip("transformers")
    import types

    from sparsekit.integrations.hf import STATE_FILE, SparsityCallback

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    saved = tmp_path / "checkpoint-3" / STATE_FILE
    saved.parent.mkdir()
    {"directory": saved.mkdir, "fifo": lambda: os.mkfifo(saved),
     "broken link": lambda: os.symlink(tmp_path / "gone", saved)}[kind]()
    gradual = sparsekit.GradualPruner(model, 0.5, start_step=0, end_step=10, every=1)
    callback = SparsityCallback(gradual)
    expected = {"directory": "a directory", "fifo": "a FIFO", "broken link": "a broken link"}
    with pytest.raises(ValueError, match=f"is no state saved by SparsityCallback: it is "
                                         f"{expected[kind]}, not a regular file"):
        callback.on_train_begin(types.SimpleNamespace(output_dir=str(tmp_path)),
                                types.SimpleNamespace(global_step=3), None,
                                model=model, optimizer=optimizer)
    assert callback.attached is None and gradual.step_count == 0
    assert not optimizer._optimizer_step_post_hooks


def test_lightning_resume_without_the_callbacks_state_warns_that_the_schedule_starts_over():
    """fit(ckpt_path=...) of a checkpoint that holds no state of the callback (saved
    without it, or before training started) silently started the schedule from its first
    step at the checkpoint's global step; it now says so, as the HF callback does. A
    later fit of the same callback, which keeps its own schedule, does not warn."""
    pytest.importorskip("lightning.pytorch")
    import types
    import warnings

    from sparsekit.integrations.lightning import SparsityCallback

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    gradual = sparsekit.GradualPruner(model, 0.5, start_step=0, end_step=10, every=1)
    callback = SparsityCallback(gradual)
    trainer = types.SimpleNamespace(optimizers=[optimizer], global_step=5)
    with pytest.warns(RuntimeWarning, match="resuming at step 5 from a checkpoint without "
                                            "its state.*from its first step"):
        callback.on_train_start(trainer, model)
    assert callback.schedule is gradual and gradual.step_count == 0
    callback.on_train_end(trainer, model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        callback.on_train_start(trainer, model)  # its own schedule goes on: nothing lost
        callback.on_train_end(trainer, model)
        fresh = SparsityCallback(sparsekit.prune(model, 0.5))
        fresh.on_train_start(types.SimpleNamespace(optimizers=[optimizer], global_step=0), model)
        fresh.on_train_end(trainer, model)


def test_hf_state_is_saved_wherever_the_trainer_saves_its_checkpoint(tmp_path):
    """With save_on_each_node, each node's local process zero writes the checkpoint, but
    the state was written by the world's process zero only: the other nodes' checkpoints
    lacked it, and they resumed their schedules from the first step."""
    pytest.importorskip("transformers")
    import types

    from sparsekit.integrations.hf import STATE_FILE, SparsityCallback

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    callback = SparsityCallback(sparsekit.prune(model, 0.5))
    state = types.SimpleNamespace(global_step=0, is_world_process_zero=False)
    callback.on_train_begin(types.SimpleNamespace(output_dir=str(tmp_path)), state, None,
                            model=model, optimizer=optimizer)
    state.global_step = 2
    (tmp_path / "checkpoint-2").mkdir()
    for should_save in (False, True):  # another node's process zero: it saves too
        callback.on_save(types.SimpleNamespace(output_dir=str(tmp_path),
                                               should_save=should_save), state, None)
        assert (tmp_path / "checkpoint-2" / STATE_FILE).is_file() == should_save
    callback.on_train_end(None, state, None)


def test_prune_refuses_a_data_dir_that_a_data_free_method_ignores(capsys, tmp_path, ckpt):
    """--data-dir with --method magnitude was read by no one: the run pruned as without
    it, and said nothing."""
    (tmp_path / "data").mkdir()
    err = user_error(capsys, "prune", str(ckpt), "--out", str(tmp_path / "o.safetensors"),
                     "--sparsity", "0.5", "--data-dir", str(tmp_path / "data"))
    assert "--data-dir applies to data-driven methods (" in err
    assert "--method 'magnitude' reads no data" in err
    assert not (tmp_path / "o.safetensors").exists()


def test_report_of_a_short_context_model_fits_its_default_tokens(capsys, tmp_path):
    """`report DIR` without --tokens measured 128 tokens whatever the model's context: a
    GPT-2 of 16 positions failed with "--tokens '1,128' does not fit the model", a flag
    that was never given. The default now fits the context; a --tokens given is kept."""
    transformers = pytest.importorskip("transformers")
    from sparsekit.cli.main import main

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2,
                                     n_positions=16, bos_token_id=0, eos_token_id=0)
    sparsekit.save_pretrained(transformers.GPT2LMHeadModel(config), tmp_path / "gpt2")
    assert main(["report", str(tmp_path / "gpt2"), "--json"]) == 0, capsys.readouterr().err
    capsys.readouterr()
    err = user_error(capsys, "report", str(tmp_path / "gpt2"), "--tokens", "1,32")
    assert "--tokens '1,32' does not fit the model" in err


@pytest.mark.parametrize(("argv", "expected"), [
    (["prune", "CKPT", "--sparsity", "0.5", "--method", "snip", "--dry-run", "--data-dir", ""],
     "--data-dir must be a directory of the dataset's IDX files, got ''"),
    (["demo", "--out", "OUT", "--data-dir", " "],
     "--data-dir must be a directory of the dataset's IDX files, got ' '"),
    (["diff", "", "CKPT"], "A must be the path of a checkpoint file or a save_pretrained "
                           "directory, got ''"),
    (["diff", "CKPT", " "], "B must be the path of a checkpoint file"),
])
def test_an_empty_path_is_named_not_read_as_the_current_directory(capsys, tmp_path, ckpt,
                                                                   argv, expected):
    """``--data-dir ""`` (an unset shell variable) was the current directory: "root '.'
    lacks the IDX files", naming no flag; ``diff "" B`` said "directory '.' holds no
    weights"."""
    out = tmp_path / "out"
    argv = [str(ckpt) if a == "CKPT" else str(out) if a == "OUT" else a for a in argv]
    err = user_error(capsys, *argv)
    assert expected in err
    assert not out.exists()


def test_a_recipe_with_an_empty_data_dir_names_the_field(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: lenet_300_100\nfinetune: {data_dir: ''}\n")
    with pytest.raises(ValueError, match=r"finetune\.data_dir: must be the directory of the "
                                         r"dataset's IDX files, got ''"):
        load_recipe(recipe)
