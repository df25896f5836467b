"""Hostile inputs, round 17: the command line and recipes.

- an empty ``--out`` (an unset shell variable) was ``Path("")``, the current directory:
  ``llm-prune`` and ``demo`` merged their output into it (``llm-prune`` replaced the
  ``config.json`` there), ``prune`` called it "'.' is a directory";
- ``prune --out x/`` (a directory meant, not yet there) and ``x/.`` wrote the file ``x``;
- ``prune --data-dir DATA --out DATA/train-images-idx3-ubyte`` replaced a file of the dataset
  with the checkpoint (the dataset was no input of the output checks); ``demo`` and a
  recipe's ``out:`` wrote into the dataset's directory;
- an ``--out`` name too long for the file system was "[Errno 36] File name too long",
  naming no flag;
- a ``prune`` write that failed (disk full) left the folders it had made for ``--out``;
- an ``--out`` name that is not valid UTF-8 was written, then printing "wrote <name>" raised
  ``UnicodeEncodeError`` (outside Python's UTF-8 mode) and the command exited 2;
- an empty checkpoint (``prune ""``) was refused as "--out ... is inside the input directory
  '.'" and ``report ""`` reported on the current directory;
- ``llm-prune ""`` loaded the model of the current directory;
- a (resealed) checkpoint whose ``model`` header entry nests deeply was a ``RecursionError``
  traceback from ``json.loads``;
- ``report DIR --tokens ""`` used the default 1,128 silently (a file refused it);
- ``report --json --markdown`` printed JSON silently, and ``--input-shape`` was ignored
  silently beside ``--tokens`` or for a save_pretrained directory;
- a model whose forward takes other arguments than the example input (``--model
  module:factory``) failed with the bare ``TypeError`` of the call, naming no flag;
- ``llm-prune --calib`` with an empty or non-UTF-8 text (no ``--eval``) was refused as
  "--eval: ...", a flag not given; for a sentence model it named no flag at all;
- ``llm-prune --seqlen`` past the model's context was refused as "seqlen 512 exceeds ..."
  (the evaluation's cap, not the value given);
- ``demo`` wrote into ``--out`` as it went: a run failing midway left a half-written
  directory (or new checkpoints beside an earlier run's results);
- a recipe nested some hundreds of levels deep was a raw ``RecursionError`` with a traceback;
- a recipe's ``out:`` holding a NUL passed ``run --check`` and failed only after every stage
  had run, as an unnamed "embedded null byte"; ``out: dir/`` (or ``dir/.``) wrote the
  file ``dir``;
- a recipe's ``lr: 1e-3`` (and the JSON ``Recipe.model_dump_json`` writes for it) was read
  as the string ``'1e-3'`` and refused: a recipe did not round-trip through JSON.
"""

from __future__ import annotations

import errno
import io
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from _cli import user_error
from _state import snapshot, unchanged

import sparsekit
from sparsekit.cli.main import main
from sparsekit.models import lenet_300_100

yaml = pytest.importorskip("yaml")
pytest.importorskip("pydantic")

from sparsekit.recipe import load_recipe  # noqa: E402


@pytest.fixture(scope="module")
def dense_file(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return sparsekit.save(lenet_300_100(), tmp_path_factory.mktemp("dense") / "d.safetensors")


@pytest.fixture
def ckpt(dense_file, tmp_path) -> Path:
    path = tmp_path / "model.safetensors"
    shutil.copyfile(dense_file, path)
    return path


def _tree(directory: Path) -> dict[str, bytes]:
    return {str(f.relative_to(directory)): f.read_bytes()
            for f in sorted(directory.rglob("*")) if f.is_file()}


@pytest.fixture
def fake_model_dir(tmp_path) -> Path:
    """A directory that looks like a save_pretrained one (refusals come before loading)."""
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    (tmp_path / "calib.txt").write_text("some calibration text\n")
    return model_dir


# -- outputs ----------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["prune", "llm-prune", "demo"])
def test_empty_out_is_refused(ckpt, fake_model_dir, tmp_path, capsys, monkeypatch, command):
    work = tmp_path / "cwd"
    work.mkdir()
    (work / "config.json").write_text('{"mine": 1}')
    monkeypatch.chdir(work)
    argv = {"prune": ["prune", str(ckpt), "--sparsity", "0.5"],
            "llm-prune": ["llm-prune", str(fake_model_dir), "--calib",
                          str(tmp_path / "calib.txt"), "--method", "magnitude"],
            "demo": ["demo", "--epochs", "1", "--sparsities", "0.5", "--train-limit", "10"]}
    before = _tree(tmp_path)
    err = user_error(capsys, *argv[command], "--out", "")
    assert "--out must be the path of the" in err and "got ''" in err
    assert _tree(tmp_path) == before


@pytest.mark.parametrize("ending", ["/", "//", "/."])
def test_out_ending_in_a_separator_is_refused(ckpt, tmp_path, capsys, ending):
    target = str(tmp_path / "x") + ending
    err = user_error(capsys, "prune", str(ckpt), "--sparsity", "0.5", "--out", target)
    assert f"--out {target!r} names a directory" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_failed_write_removes_the_folders_made_for_it(ckpt, tmp_path, capsys, monkeypatch):
    before = ckpt.read_bytes()

    def full_disk(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full_disk)
    out = tmp_path / "new" / "deeper" / "pruned.safetensors"
    err = user_error(capsys, "prune", str(ckpt), "--out", str(out), "--sparsity", "0.5")
    assert os.strerror(errno.ENOSPC) in err and str(out) in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    assert ckpt.read_bytes() == before


@pytest.mark.parametrize("command", ["prune", "demo"])
def test_out_name_too_long_names_the_flag(ckpt, tmp_path, capsys, command):
    """Was "[Errno 36] File name too long: '...'", naming no flag."""
    name = str(tmp_path / ("a" * 300))
    argv = (["prune", str(ckpt), "--sparsity", "0.5", "--out", name] if command == "prune"
            else ["demo", "--epochs", "1", "--out", name])
    err = user_error(capsys, *argv)
    assert err.startswith(f"sparsekit {command}: error: --out {name!r}: ")
    assert os.strerror(errno.ENAMETOOLONG) in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte")


@pytest.fixture
def data_dir(tmp_path) -> Path:
    """A dataset directory (placeholders: every refusal comes before it is read)."""
    root = tmp_path / "data"
    root.mkdir()
    for name in IDX_FILES:
        (root / name).write_bytes(b"idx " + name.encode())
    return root


@pytest.mark.parametrize("command", ["prune", "demo", "run"])
def test_out_into_the_dataset_is_refused(ckpt, data_dir, tmp_path, capsys, command):
    """--out DATA/train-images-idx3-ubyte replaced the dataset's file with a checkpoint
    (the data directory was no input of the output checks); demo and run wrote into it."""
    target = data_dir / IDX_FILES[0]
    argv = {
        "prune": ["prune", str(ckpt), "--sparsity", "0.5", "--data-dir", str(data_dir),
                  "--out", str(target)],
        "demo": ["demo", "--data-dir", str(data_dir), "--out", str(data_dir / "results")],
        "run": ["run", str(_recipe(tmp_path, "model: lenet_300_100\nprune: {sparsity: 0.5}\n"
                                   f"finetune: {{data_dir: '{data_dir}'}}\nreport: null\n"
                                   f"out: '{data_dir / 'pruned.safetensors'}'\n")), "--check"],
    }[command]
    before = _tree(data_dir)
    err = user_error(capsys, *argv)
    assert f"is inside the input directory {str(data_dir)!r}" in err
    assert _tree(data_dir) == before and sorted(p.name for p in data_dir.iterdir()) == sorted(
        IDX_FILES)


def test_out_name_that_is_not_utf8_is_printed_escaped(ckpt, tmp_path, monkeypatch):
    if os.fsencode("\udcff") != b"\xff":
        pytest.skip("needs a file system encoding that keeps undecodable bytes (POSIX)")
    raw = io.BytesIO()
    stdout = io.TextIOWrapper(raw, encoding="utf-8", errors="strict")  # not UTF-8 mode
    monkeypatch.setattr(sys, "stdout", stdout)
    out = tmp_path / "\udcff.safetensors"  # argv's decoding of the bytes b"\xff.safetensors"
    assert main(["prune", str(ckpt), "--out", str(out), "--sparsity", "0.5", "--markdown"]) == 0
    stdout.flush()
    assert b"wrote " in raw.getvalue() and b"\\udcff.safetensors" in raw.getvalue()
    assert out.is_file() and stdout.errors == "strict"


# -- inputs -----------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["prune", "report"])
def test_empty_checkpoint_is_named(tmp_path, capsys, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.json").write_text("{}")  # report "" read the current directory
    extra = ["--sparsity", "0.5", "--out", "x.safetensors"] if command == "prune" else []
    err = user_error(capsys, command, "", *extra)
    assert "checkpoint must be the path of a checkpoint file, got ''" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


@pytest.mark.parametrize("record", [
    "[" * 100_000 + "]" * 100_000,
    '{"name": "lenet_300_100", "kwargs": ' + '{"a": ' * 100_000 + "1" + "}" * 100_001,
])
def test_deeply_nested_model_record_is_refused(ckpt, tmp_path, capsys, record):
    """A resealed header whose ``model`` entry nests deeply was a ``RecursionError``
    traceback from ``json.loads``."""
    from safetensors.torch import load_file, save_file

    from sparsekit import checkpoint

    meta = checkpoint.read(ckpt).meta
    meta["model"] = record
    meta["digest"] = checkpoint._header_digest(meta)  # an attacker can reseal
    crafted = tmp_path / "crafted.safetensors"
    save_file(load_file(ckpt), crafted, metadata=meta)
    before = crafted.read_bytes()
    err = user_error(capsys, "report", str(crafted))
    assert "header entry 'model' must be" in err and "--model" in err
    assert crafted.read_bytes() == before


def test_llm_prune_empty_model_dir(fake_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(fake_model_dir)  # "" was this directory, loaded as the model
    err = user_error(capsys, "llm-prune", "", "--calib", str(tmp_path / "calib.txt"),
                     "--out", str(tmp_path / "out"))
    assert "MODEL_DIR must be a save_pretrained directory, got ''" in err
    assert not (tmp_path / "out").exists()


class _TwoInputs(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(784, 10)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1)) + y


@pytest.mark.parametrize("shape", [None, "1,784"])
def test_input_shape_for_a_model_taking_other_arguments_names_the_flag(shape):
    """A ``--model module:factory`` whose forward takes two inputs: the TypeError of the
    call was the whole message ("forward() missing 1 required positional argument")."""
    from sparsekit.cli._errors import UsageError
    from sparsekit.cli._model import example_inputs

    model = _TwoInputs()
    before = snapshot(model)
    with pytest.raises(UsageError, match=r"--input-shape '1,.*' does not fit the model \("
                       r".*missing 1 required positional argument"):
        example_inputs(shape, model)
    assert unchanged(model, before)


# -- conflicting flags ------------------------------------------------------------------------


@pytest.mark.parametrize(("flags", "needle"), [
    (["--json", "--markdown"], "--json and --markdown"),
    (["--tokens", "1,8", "--input-shape", "1,784"], "--tokens and --input-shape"),
])
def test_report_flags_that_would_be_ignored(ckpt, capsys, flags, needle):
    assert needle in user_error(capsys, "report", str(ckpt), *flags)


def test_report_input_shape_for_a_directory(fake_model_dir, capsys):
    err = user_error(capsys, "report", str(fake_model_dir), "--input-shape", "1,784")
    assert "--input-shape does not apply to a save_pretrained directory" in err


def test_report_default_input_shape_still_applies(ckpt, capsys):
    assert main(["report", str(ckpt), "--markdown"]) == 0
    assert "fc1" in capsys.readouterr().out


@pytest.fixture(scope="module")
def tiny_llamas():
    """A causal and a sentence (encoder) tiny LLaMA with a byte tokenizer, in memory."""
    transformers = pytest.importorskip("transformers")
    from sparsekit import llm

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    return {True: transformers.LlamaForCausalLM(config).eval(),
            False: transformers.LlamaModel(config).eval()}, llm.byte_tokenizer()


def _llm_prune_loading(monkeypatch, tiny_llamas, causal: bool) -> None:
    """``llm-prune`` loads one of ``tiny_llamas`` (whatever MODEL_DIR holds)."""
    from sparsekit.cli import llm_prune

    models, tokenizer = tiny_llamas
    monkeypatch.setattr(llm_prune, "_load", lambda _dir: (models[causal], tokenizer, causal))


def test_report_empty_tokens_for_a_directory_is_refused(tmp_path, capsys, tiny_llamas):
    """``--tokens ""`` fell back to the default 1,128 for a save_pretrained directory (and
    was refused for a file)."""
    import copy

    model = copy.deepcopy(tiny_llamas[0][True])
    directory = sparsekit.save_pretrained(model, tmp_path / "llama", sparsekit.prune(model, 0.5))
    capsys.readouterr()
    assert "--tokens must be comma-separated integers" in user_error(
        capsys, "report", str(directory), "--tokens", "")


def test_llm_prune_seqlen_past_the_context_names_the_value(tmp_path, capsys, monkeypatch,
                                                          tiny_llamas):
    _llm_prune_loading(monkeypatch, tiny_llamas, causal=True)
    (tmp_path / "model").mkdir()
    (tmp_path / "calib.txt").write_text("First Citizen: hear me speak.\n" * 20)
    before = snapshot(tiny_llamas[0][True])
    err = user_error(capsys, "llm-prune", str(tmp_path / "model"), "--calib",
                     str(tmp_path / "calib.txt"), "--out", str(tmp_path / "out"),
                     "--seqlen", "1000")
    assert "seqlen 1000 exceeds the model's context of 64 tokens" in err
    assert not (tmp_path / "out").exists() and unchanged(tiny_llamas[0][True], before)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(("flag", "content", "needle"), [
    ("--calib", b"", "--calib: the text is empty"),
    ("--calib", b" \n \n", "--calib: the text is empty"),
    ("--calib", b"\x9c\xff", "--calib: the text file"),
    ("--eval", b" \n", "--eval: the text is empty"),
    ("--eval", b"\x9c\xff", "--eval: the text file"),
])
def test_llm_prune_unusable_text_names_its_flag(tmp_path, capsys, monkeypatch, tiny_llamas,
                                                causal, flag, content, needle):
    """The evaluation text is --calib's without --eval: "--eval: the text is empty" named a
    flag not given, and a sentence model's text problems named no flag at all."""
    _llm_prune_loading(monkeypatch, tiny_llamas, causal)
    (tmp_path / "model").mkdir()
    good, bad = tmp_path / "good.txt", tmp_path / "bad.txt"
    good.write_text("First Citizen: hear me speak.\n" * 20)
    bad.write_bytes(content)
    texts = ["--calib", str(bad)] if flag == "--calib" else ["--calib", str(good), "--eval",
                                                             str(bad)]
    before = snapshot(tiny_llamas[0][causal])
    err = user_error(capsys, "llm-prune", str(tmp_path / "model"), *texts,
                     "--out", str(tmp_path / "out"), "--method", "magnitude")
    assert needle in err
    assert not (tmp_path / "out").exists() and unchanged(tiny_llamas[0][causal], before)


# -- demo: nothing half-written ---------------------------------------------------------------


@pytest.mark.parametrize("existing", [False, True])
def test_demo_failing_midway_leaves_no_output(tmp_path, capsys, monkeypatch, existing):
    from torch.utils.data import TensorDataset

    from sparsekit.cli import demo
    from sparsekit.data.images import ImageDataset

    torch.manual_seed(0)
    split = TensorDataset(torch.randn(32, 1, 8, 8), torch.randint(0, 4, (32,)))
    tiny = ImageDataset(train=split, test=split, name="tiny", num_classes=4,
                        image_shape=(1, 8, 8))
    monkeypatch.setattr(demo, "load_image_dataset", lambda root: tiny)
    out = tmp_path / "out"
    if existing:  # an earlier run's results stay as they were
        out.mkdir()
        (out / "results.json").write_text('{"earlier": true}')
    before = _tree(tmp_path), sorted(p.name for p in tmp_path.iterdir())
    real_save = sparsekit.save
    calls = []

    def full_disk_on_the_second(*args, **kwargs):
        calls.append(args)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(demo.sparsekit, "save", full_disk_on_the_second)
    err = user_error(capsys, "demo", "--out", str(out), "--epochs", "1", "--finetune-epochs",
                     "0", "--sparsities", "0.5")
    assert "No space left on device" in err and str(out) in err
    assert len(calls) == 2  # dense.safetensors was written, the first run's was not
    assert (_tree(tmp_path), sorted(p.name for p in tmp_path.iterdir())) == before


# -- recipes ----------------------------------------------------------------------------------


def _recipe(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("depth", [33, 600, 5000])
def test_recipe_nested_too_deeply(tmp_path, capsys, depth):
    """Refused by its depth, whether PyYAML built it (33; 600 under some PyYAML versions and
    stacks) or ran out of recursion (5000)."""
    path = _recipe(tmp_path, "model: lenet_300_100\nx: " + "[" * depth + "]" * depth + "\n")
    with pytest.raises(ValueError, match="nested too deeply"):
        load_recipe(path)
    assert "nested too deeply" in user_error(capsys, "run", str(path), "--check")


def test_a_recipe_that_holds_itself_is_nested_too_deeply(tmp_path):
    """A YAML anchor inside its own value (``&a [*a]``) loads as a list holding itself."""
    path = _recipe(tmp_path, "model: lenet_300_100\nx: &a [1, *a]\n")
    with pytest.raises(ValueError, match="nested too deeply"):
        load_recipe(path)


def test_a_recipe_as_deep_as_allowed_meets_its_schema(tmp_path):
    """32 levels (the mapping and 31 lists) are not refused for their depth: the schema
    then names the unknown field."""
    path = _recipe(tmp_path, "model: lenet_300_100\nx: " + "[" * 31 + "]" * 31 + "\n")
    with pytest.raises(ValueError, match="x: Extra inputs are not permitted"):
        load_recipe(path)


@pytest.mark.parametrize("out", ['"a\\0b.safetensors"', "sub/", "'sub//'", "sub/."])
def test_recipe_out_that_is_no_file_is_refused_by_check(tmp_path, capsys, monkeypatch, out):
    monkeypatch.chdir(tmp_path)
    path = _recipe(tmp_path, "model: lenet_300_100\ninput_shape: [1, 784]\n"
                   f"prune: {{sparsity: 0.5}}\nreport: null\nout: {out}\n")
    with pytest.raises(ValueError, match=r"out: cannot write .*must be the path of the checkpoint"):
        load_recipe(path)
    for check in (["--check"], []):
        assert "out: cannot write" in user_error(capsys, "run", str(path), *check)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]


@pytest.mark.parametrize(("text", "value"), [
    ("1e-3", 1e-3), ("1e-05", 1e-5), ("1.0e-4", 1e-4), ("2E+0", 2.0), (".5e-1", 0.05),
])
def test_recipe_exponent_floats(tmp_path, text, value):
    recipe = load_recipe(_recipe(tmp_path, f"model: lenet_300_100\nfinetune: {{lr: {text}}}\n"))
    assert recipe.finetune.lr == value


def test_recipe_strings_stay_strings(tmp_path):
    """Quoted numbers and names that only look like exponents are not numbers."""
    with pytest.raises(ValueError, match=r"finetune\.lr: Input should be a valid number"):
        load_recipe(_recipe(tmp_path, "model: lenet_300_100\nfinetune: {lr: '1e-3'}\n"))
    recipe = load_recipe(_recipe(tmp_path, "model: lenet_300_100\nout: 1e3x\n"))
    assert recipe.out == "1e3x"


@pytest.mark.parametrize("dump", ["yaml", "json"])
def test_recipe_round_trips(tmp_path, dump):
    text = ("model: lenet_300_100\ninput_shape: [1, 784]\nseed: 9223372036854775807\n"
            "prune: {sparsity: 0.5, exclude: [fc3], pattern: '2:4'}\n"
            "finetune: {lr: 1.0e-7, epochs: 2, schedule: gradual, ramp: 0.5}\n"
            "compile: {formats: [csr16, dense], rows: [1, 64]}\nout: 'yes.safetensors'\n")
    recipe = load_recipe(_recipe(tmp_path, text))
    saved = (yaml.safe_dump(recipe.model_dump()) if dump == "yaml"
             else recipe.model_dump_json())
    again = tmp_path / f"again.{dump}"
    again.write_text(saved, encoding="utf-8")
    assert load_recipe(again) == recipe
    assert os.path.getsize(again) > 0
