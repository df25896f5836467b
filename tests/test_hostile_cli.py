"""Hostile command lines (issue 17, items 4, 5 and 10): the CLI never loses its input,
never allocates what a crafted header asks for, never runs code from the current directory
by accident, and answers every user mistake with one line on stderr and exit status 2.

Commands run in-process through ``sparsekit.cli.main.main``; one test needs a real
``python -m`` subprocess, since that is what puts the current directory on ``sys.path``.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from _cli import user_error
from safetensors.torch import load_file, save_file

import sparsekit
from sparsekit import checkpoint
from sparsekit.checkpoint import read
from sparsekit.cli.main import main
from sparsekit.models import lenet_300_100


@pytest.fixture(scope="module")
def dense_file(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("dense") / "dense.safetensors"
    sparsekit.save(lenet_300_100(), path)
    return path


@pytest.fixture
def ckpt(dense_file, tmp_path) -> Path:
    """A private copy of a dense LeNet-300-100 checkpoint (tests may try to destroy it)."""
    path = tmp_path / "model.safetensors"
    shutil.copyfile(dense_file, path)
    return path


def with_metadata(src: Path, dst: Path, *, seal: bool = True, **entries: str) -> Path:
    """``src`` rewritten with some header entries replaced (tensor data unchanged) and,
    unless ``seal=False``, sealed again: an attacker can re-seal, so the checks behind the
    seal must hold on their own."""
    tensors = load_file(src)
    meta = read(src).meta
    meta.update(entries)
    if seal:
        meta["digest"] = checkpoint._header_digest(meta)
    save_file(tensors, dst, metadata=meta)
    return dst


# -- the input is never lost ------------------------------------------------------------------


@pytest.mark.parametrize("link", ["same path", "symlink", "hard link", "missing folder, ..",
                                  "dangling symlink"])
def test_prune_refuses_to_write_over_its_input(ckpt, tmp_path, capsys, link):
    """``nodir/../model.safetensors`` names no file until the save makes ``nodir``, then is
    the input (replaced, exit 0, ``nodir`` left behind); a link to that spelling replaced the
    input and then failed on the link still dangling."""
    before = ckpt.read_bytes()
    out = ckpt
    if link == "symlink":
        out = tmp_path / "alias.safetensors"
        out.symlink_to(ckpt)
    elif link == "hard link":
        out = tmp_path / "alias.safetensors"
        os.link(ckpt, out)
    elif link == "missing folder, ..":
        out = tmp_path / "nodir" / ".." / ckpt.name
    elif link == "dangling symlink":
        out = tmp_path / "alias.safetensors"
        out.symlink_to(Path("nodir") / ".." / ckpt.name)
    # the original report: --out = input, then a failing report step replaced the input
    err = user_error(capsys, "prune", str(ckpt), "--out", str(out), "--sparsity", "0.5",
                     "--input-shape", "1,5")
    assert "--overwrite" in err
    assert ckpt.read_bytes() == before
    assert not (tmp_path / "nodir").exists()


def test_overwrite_replaces_the_input_only_at_the_end(ckpt, capsys):
    before = ckpt.read_bytes()
    user_error(capsys, "prune", str(ckpt), "--out", str(ckpt), "--overwrite",
               "--sparsity", "0.5", "--input-shape", "1,5")
    assert ckpt.read_bytes() == before  # the failing step came first: nothing written

    assert main(["prune", str(ckpt), "--out", str(ckpt), "--overwrite", "--sparsity", "0.5",
                 "--markdown"]) == 0
    masks = sparsekit.load(lenet_300_100(), ckpt)
    assert masks.sparsity() == pytest.approx(0.5)


def test_nothing_is_written_when_a_later_step_fails(ckpt, tmp_path, capsys):
    out = tmp_path / "new" / "pruned.safetensors"
    user_error(capsys, "prune", str(ckpt), "--out", str(out), "--sparsity", "0.5",
               "--input-shape", "1,1,28,29")
    assert not out.exists() and not out.parent.exists()


def test_out_an_existing_directory(ckpt, tmp_path, capsys):
    out = tmp_path / "somedir"
    out.mkdir()
    err = user_error(capsys, "prune", str(ckpt), "--out", str(out), "--sparsity", "0.5")
    assert "is a directory" in err
    assert list(out.iterdir()) == []


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_out_not_a_regular_file(ckpt, tmp_path, capsys):
    # A device or pipe is never replaced (as root, --out /dev/full used to replace the device).
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    err = user_error(capsys, "prune", str(ckpt), "--out", str(fifo), "--sparsity", "0.5")
    assert "not a regular file" in err
    assert fifo.exists() and not fifo.is_file()


def test_out_in_a_directory_that_is_not_writable(ckpt, tmp_path, capsys, monkeypatch):
    # access(2) answers EROFS / EACCES the same way; as root only a read-only mount says no.
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: (
        False if Path(p) == locked else real_access(p, mode, **kw)))
    err = user_error(capsys, "prune", str(ckpt), "--out", str(locked / "x.safetensors"),
                     "--sparsity", "0.5")
    assert "not writable" in err


def test_out_under_a_file(ckpt, tmp_path, capsys):
    err = user_error(capsys, "prune", str(ckpt), "--out", str(ckpt / "x.safetensors"),
                     "--sparsity", "0.5")
    assert "not a directory" in err


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EIO])
def test_write_failures_are_one_line(ckpt, tmp_path, capsys, monkeypatch, code):
    before = ckpt.read_bytes()

    def failing_fsync(fd):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "fsync", failing_fsync)
    out = tmp_path / "pruned.safetensors"
    err = user_error(capsys, "prune", str(ckpt), "--out", str(out), "--sparsity", "0.5")
    assert os.strerror(code) in err and str(out) in err
    assert not out.exists()
    assert ckpt.read_bytes() == before


# -- --input-shape --------------------------------------------------------------------------


@pytest.mark.parametrize(("shape", "needle"), [
    ("0,0", "≥ 1"),
    ("-1", "≥ 1"),
    ("1,5", "does not fit the model"),
    ("1,1,28,29", "does not fit the model"),
    ("100000,100000,100000", "at most"),
    ("1,,28", "comma-separated integers"),
])
@pytest.mark.parametrize("command", ["report", "prune"])
def test_bad_input_shapes(ckpt, tmp_path, capsys, shape, needle, command):
    extra = ["--out", str(tmp_path / "o.safetensors"), "--sparsity", "0.5"] * (command == "prune")
    err = user_error(capsys, command, str(ckpt), f"--input-shape={shape}", *extra)
    assert needle in err
    assert not (tmp_path / "o.safetensors").exists()


# -- crafted headers ------------------------------------------------------------------------


@pytest.mark.parametrize(("record", "needle"), [
    ("{}", "header entry 'model'"),
    ("[1]", "header entry 'model'"),
    ("not json", "header entry 'model'"),
    ('{"name": 3}', "header entry 'model'"),
    ('{"name": "lenet_300_100", "extra": 1}', "header entry 'model'"),
    ('{"name": "builtins:exit"}', "not registered"),
    ('{"name": "lenet_300_100", "kwargs": []}', "integers in [1,"),
    ('{"name": "lenet_300_100", "kwargs": {"in_features": 1000000000000}}', "integers in [1,"),
    ('{"name": "lenet_300_100", "kwargs": {"in_features": true}}', "integers in [1,"),
    ('{"name": "lenet_300_100", "kwargs": {"in_features": 0}}', "integers in [1,"),
    ('{"name": "lenet_300_100", "kwargs": {"depth": 3}}', "cannot be built"),
    # in range, but 2.5 TB if built: the model builders refuse it before allocating
    ('{"name": "lenet_300_100", "kwargs": {"in_features": 2147483647}}',
     "at most 2,147,483,648 parameters"),
    ('{"name": "lenet5"}', "does not match"),
])
def test_malformed_model_record(ckpt, tmp_path, capsys, record, needle):
    path = with_metadata(ckpt, tmp_path / "crafted.safetensors", model=record)
    err = user_error(capsys, "report", str(path))
    assert needle in err
    assert "--model" in err or "not registered" in err


def test_unsealed_model_record_edit_is_refused_before_it_is_read(ckpt, tmp_path, capsys):
    record = '{"name": "lenet_300_100", "kwargs": {"in_features": 1000000000000}}'
    path = with_metadata(ckpt, tmp_path / "edited.safetensors", seal=False, model=record)
    assert "digest mismatch" in user_error(capsys, "report", str(path))


def test_missing_model_record_asks_for_model(tmp_path, capsys):
    path = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in lenet_300_100().state_dict().items()}, path)
    assert "--model" in user_error(capsys, "report", str(path))
    assert main(["report", str(path), "--model", "lenet_300_100", "--markdown"]) == 0


@pytest.mark.parametrize("model", [[], ["--model", "lenet_300_100"]])
def test_tensors_entry_as_a_list(ckpt, tmp_path, capsys, model):
    entries = json.loads(read(ckpt).meta["tensors"])
    listed = json.dumps(list(entries.items()))
    path = with_metadata(ckpt, tmp_path / "crafted.safetensors", tensors=listed)
    assert "'tensors'" in user_error(capsys, "report", str(path), *model)


@pytest.mark.parametrize("kind", ["directory", "device"])
def test_checkpoint_that_is_not_a_file(tmp_path, capsys, kind):
    path = tmp_path if kind == "directory" else Path(os.devnull)
    assert "not a regular file" in user_error(capsys, "report", str(path))


# -- --model module:factory -----------------------------------------------------------------


@pytest.mark.parametrize(("spec", "needle"), [
    ("builtins:exit", "SystemExit"),
    ("builtins:int", "returned int, not an nn.Module"),
    ("builtins:len", "raised TypeError"),
    ("os:sep", "no callable 'sep'"),
    ("no_such_module_for_sparsekit:f", "cannot import"),
    ("no_such_model", "accepted: lenet5, lenet_300_100"),
])
def test_bad_model_factories(ckpt, capsys, spec, needle):
    assert needle in user_error(capsys, "report", str(ckpt), "--model", spec)


@pytest.fixture
def planted_module(tmp_path, monkeypatch):
    """A module in the current directory that leaves a marker when imported."""
    name = f"planted_{uuid.uuid4().hex[:8]}"
    marker = tmp_path / "imported"
    (tmp_path / f"{name}.py").write_text(
        "import pathlib\n"
        f"pathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from sparsekit.models import lenet_300_100 as make\n"
    )
    monkeypatch.chdir(tmp_path)
    yield name, marker
    sys.modules.pop(name, None)


def test_model_factory_ignores_the_current_directory(ckpt, capsys, monkeypatch, planted_module):
    name, marker = planted_module
    monkeypatch.setattr(sys, "path", [os.getcwd(), *sys.path])  # as `python -m` puts it
    err = user_error(capsys, "report", str(ckpt), "--model", f"{name}:make")
    assert "current directory is not searched" in err
    assert not marker.exists()
    assert sys.path[0] == os.getcwd()  # restored


def test_model_factory_from_an_explicit_path(ckpt, capsys, monkeypatch, planted_module):
    name, marker = planted_module
    # as `PYTHONPATH=. python -m ...` puts it: the second entry is the user's choice
    monkeypatch.setattr(sys, "path", [os.getcwd(), os.getcwd(), *sys.path])
    assert main(["report", str(ckpt), "--model", f"{name}:make", "--markdown"]) == 0
    assert marker.read_text() == "ran"


def test_python_m_does_not_import_from_the_current_directory(ckpt, planted_module):
    name, marker = planted_module
    done = subprocess.run(
        [sys.executable, "-m", "sparsekit.cli.main", "report", str(ckpt), "--model",
         f"{name}:make"],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 2, done.stderr
    assert "current directory is not searched" in done.stderr
    assert not marker.exists()


@pytest.mark.parametrize("command", ["prune", "report"])
def test_help_says_module_factory_is_trusted_code(capsys, command):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    assert "TRUSTED CODE" in " ".join(capsys.readouterr().out.split())


# -- llm-prune ------------------------------------------------------------------------------


@pytest.fixture
def calib(tmp_path) -> Path:
    path = tmp_path / "calib.txt"
    path.write_text("some calibration text\n")
    return path


def test_llm_prune_invalid_config(tmp_path, calib, capsys):
    pytest.importorskip("transformers")
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{not json")
    err = user_error(capsys, "llm-prune", str(model_dir), "--calib", str(calib),
                     "--out", str(tmp_path / "out"))
    assert "cannot load" in err and not (tmp_path / "out").exists()


def test_llm_prune_directory_without_weights(tmp_path, calib, capsys):
    transformers = pytest.importorskip("transformers")
    model_dir = tmp_path / "model"
    transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                             num_hidden_layers=1, num_attention_heads=2, bos_token_id=1,
                             eos_token_id=2).save_pretrained(model_dir)
    err = user_error(capsys, "llm-prune", str(model_dir), "--calib", str(calib),
                     "--out", str(tmp_path / "out"))
    assert "cannot load" in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("out", ["model dir", "a file"])
def test_llm_prune_bad_out(tmp_path, calib, capsys, out):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    target = model_dir if out == "model dir" else calib
    before = sorted(p.name for p in model_dir.iterdir())
    err = user_error(capsys, "llm-prune", str(model_dir), "--calib", str(calib),
                     "--out", str(target))
    assert ("another directory" if out == "model dir" else "not a directory") in err
    assert sorted(p.name for p in model_dir.iterdir()) == before


@pytest.mark.parametrize("limit", ["0", "-5"])
def test_demo_train_limit_must_be_positive(tmp_path, capsys, limit):
    """0 trained on all 60,000 images, -5 on all but the last 5."""
    err = user_error(capsys, "demo", "--out", str(tmp_path / "out"), "--train-limit", limit)
    assert "--train-limit must be ≥ 1" in err


def test_prune_calib_batches_must_be_positive(ckpt, tmp_path, capsys):
    err = user_error(capsys, "prune", str(ckpt), "--out", str(tmp_path / "p.safetensors"),
                     "--sparsity", "0.5", "--calib-batches", "-1")
    assert "--calib-batches must be ≥ 1, got -1" in err


def test_demo_out_an_existing_file(ckpt, capsys):
    before = ckpt.read_bytes()
    assert "not a directory" in user_error(capsys, "demo", "--out", str(ckpt), "--epochs", "1")
    assert ckpt.read_bytes() == before


def test_llm_prune_out_directory_not_writable(tmp_path, calib, capsys, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "model").mkdir()  # beside out (an out inside the model is refused first)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: (
        False if Path(p) == out else real_access(p, mode, **kw)))
    err = user_error(capsys, "llm-prune", str(tmp_path / "model"), "--calib", str(calib),
                     "--out", str(out))
    assert "not writable" in err

@pytest.mark.parametrize("flag, value, needle", [
    ("--eval-tokens", "-5", "--eval-tokens must be an int ≥ 2"),  # scored all but 5 tokens
    ("--eval-tokens", "0", "--eval-tokens must be an int ≥ 2"),  # named seqlen instead
    ("--device", "nope", "--device must be a torch device"),  # was a traceback
])
def test_llm_prune_bad_numbers_and_devices(tmp_path, calib, capsys, flag, value, needle):
    err = user_error(capsys, "llm-prune", str(tmp_path), "--calib", str(calib),
                     "--out", str(tmp_path / "out"), flag, value)
    assert needle in err and not (tmp_path / "out").exists()

# -- bugs are not user errors ---------------------------------------------------------------


def test_internal_errors_keep_their_traceback(ckpt, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("a bug in sparsekit")

    monkeypatch.setattr(sparsekit, "prune", broken)
    with pytest.raises(RuntimeError, match="a bug in sparsekit"):
        main(["prune", str(ckpt), "--out", str(tmp_path / "o.safetensors"), "--sparsity", "0.5"])
    assert not (tmp_path / "o.safetensors").exists()


# -- outputs inside inputs, and outputs that fail midway -------------------------------------


def _tree(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` (relative name -> bytes)."""
    return {str(f.relative_to(directory)): f.read_bytes()
            for f in sorted(directory.rglob("*")) if f.is_file()}


@pytest.mark.parametrize("where", ["module folder", "new folder inside", "symlink inside"])
def test_llm_prune_out_inside_the_model_directory(tmp_path, calib, capsys, where):
    """--out MODEL/1_Pooling (a sentence-transformers module folder) exited 0 and wrote the
    pruned model over the input's files: only an out that *is* the input was refused."""
    model_dir = tmp_path / "model"
    (model_dir / "1_Pooling").mkdir(parents=True)
    (model_dir / "config.json").write_text("{}")
    (model_dir / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    out = {"module folder": model_dir / "1_Pooling",
           "new folder inside": model_dir / "1_Pooling" / "new" / "deeper",
           "symlink inside": tmp_path / "link"}[where]
    if where == "symlink inside":
        out.symlink_to(model_dir / "1_Pooling", target_is_directory=True)
    before = _tree(model_dir)
    err = user_error(capsys, "llm-prune", str(model_dir), "--calib", str(calib),
                     "--out", str(out))
    assert "is inside the input directory" in err and "another directory" in err
    assert _tree(model_dir) == before
    assert not (model_dir / "1_Pooling" / "new").exists()


@pytest.mark.parametrize("held", ["model", "calib"])
def test_llm_prune_out_holding_an_input(tmp_path, capsys, held):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    calib = tmp_path / "text" / "calib.txt"
    calib.parent.mkdir()
    calib.write_text("some calibration text\n")
    out = tmp_path if held == "model" else calib.parent
    before = _tree(tmp_path)
    err = user_error(capsys, "llm-prune", str(model_dir), "--calib", str(calib),
                     "--out", str(out))
    assert "holds the input" in err
    assert _tree(tmp_path) == before


@pytest.mark.parametrize("spelling", ["same", "symlink", "missing folder, .."])
def test_run_out_naming_the_recipe_is_refused(tmp_path, capsys, monkeypatch, spelling):
    """out: r.yaml replaced the recipe with a checkpoint (exit 0, no --overwrite asked), and
    so did out: nodir/../r.yaml (no such file until the save made nodir)."""
    monkeypatch.chdir(tmp_path)
    if spelling == "symlink":
        Path("alias.yaml").symlink_to("r.yaml")
    out = {"same": "r.yaml", "symlink": "alias.yaml", "missing folder, ..": "nodir/../r.yaml"}[
        spelling]
    recipe = Path("r.yaml")
    recipe.write_text("model: lenet_300_100\ninput_shape: [1, 784]\nprune: {sparsity: 0.5}\n"
                      f"report: null\nout: {out}\n")
    before = recipe.read_bytes()
    for check in (["--check"], []):
        err = user_error(capsys, "run", "r.yaml", *check)
        assert f"out: {out!r} is the input 'r.yaml'; write to another file" in err
        assert recipe.read_bytes() == before


@pytest.mark.parametrize("spelling", ["same", "missing folder, .."])
def test_run_out_naming_the_checkpoint_is_refused(ckpt, tmp_path, capsys, spelling):
    out = ckpt if spelling == "same" else tmp_path / "nodir" / ".." / ckpt.name
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: lenet_300_100\ninput_shape: [1, 784]\ncheckpoint: {ckpt}\n"
                      f"prune: {{sparsity: 0.5}}\nreport: null\nout: {out}\n")
    before = ckpt.read_bytes()
    err = user_error(capsys, "run", str(recipe))
    assert "is the input" in err and "--overwrite" not in err  # run has no such flag
    assert ckpt.read_bytes() == before


def _sentence_llama(tmp_path: Path) -> Path:
    """A tiny LLaMA saved with a tokenizer and a sentence-transformers module folder."""
    transformers = pytest.importorskip("transformers")
    from sparsekit import llm

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    model_dir = tmp_path / "model"
    transformers.LlamaForCausalLM(config).save_pretrained(model_dir)
    llm.byte_tokenizer().save_pretrained(model_dir)
    (model_dir / "modules.json").write_text(json.dumps(
        [{"idx": 0, "name": "0", "path": "", "type": "x"},
         {"idx": 1, "name": "1", "path": "1_Pooling", "type": "y"}]))
    (model_dir / "1_Pooling").mkdir()
    (model_dir / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": 1}')
    (tmp_path / "calib.txt").write_text("First Citizen: Before we proceed, hear me speak.\n" * 20)
    return model_dir


def test_llm_prune_failing_midway_leaves_no_output(tmp_path, capsys, monkeypatch):
    """A copy failing after save_pretrained had written left a partial output directory
    (exit 2); an earlier output in --out was half replaced. The output is now built
    beside --out and put in place only when complete."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model_dir = _sentence_llama(tmp_path)
    base = ["llm-prune", str(model_dir), "--calib", str(tmp_path / "calib.txt"),
            "--method", "magnitude", "--nsamples", "2", "--seqlen", "16"]
    out = tmp_path / "out"
    assert main([*base, "--out", str(out)]) == 0
    (out / "notes.txt").write_text("the user's own file")
    before = _tree(out)
    capsys.readouterr()

    from sparsekit.cli import llm_prune

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(llm_prune.shutil, "copytree", full_disk)
        for target in (out, tmp_path / "new" / "deeper" / "out"):
            err = user_error(capsys, *base, "--out", str(target), "--seed", "1")
            assert "No space left on device" in err and str(target) in err
        assert _tree(out) == before  # the earlier output, as it was
        assert not (tmp_path / "new").exists()  # nor the parents made for it
        assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt", "model", "out"]

    assert main([*base, "--out", str(out), "--seed", "1"]) == 0  # complete: replaces
    assert (out / "notes.txt").read_text() == "the user's own file"  # others stay
    assert (out / "1_Pooling" / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt", "model", "out"]
    sparsekit.from_pretrained(out)


def test_llm_prune_broken_module_file_is_refused_before_pruning(tmp_path, calib, capsys):
    model_dir = tmp_path / "model"
    (model_dir / "1_Pooling").mkdir(parents=True)
    (model_dir / "config.json").write_text("{}")
    (model_dir / "modules.json").write_text(json.dumps([{"path": "1_Pooling"}]))
    (model_dir / "1_Pooling" / "extra.json").symlink_to(tmp_path / "nonexistent")
    err = user_error(capsys, "llm-prune", str(model_dir), "--calib", str(calib),
                     "--out", str(tmp_path / "out"))
    assert "broken symlink" in err and not (tmp_path / "out").exists()
