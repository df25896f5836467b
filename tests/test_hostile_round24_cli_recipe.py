"""Hostile inputs, round 24: the CLI's commands and recipes.

Each case was refused only after the work it should have prevented (the dense evaluation
of ``llm-prune``, the stages of a recipe that ``--check`` had called valid), gave a
message naming no flag or field, spread over several lines, or left a file behind; every
refusal here leaves the inputs and the outputs as they were.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch
from _cli import user_error

import sparsekit
from sparsekit.cli import llm_prune
from sparsekit.cli.main import main
from sparsekit.recipe import load_recipe

CALIB = "First Citizen: Before we proceed any further, hear me speak.\n" * 20


@pytest.fixture
def ckpt(lenet_checkpoint) -> Path:
    return lenet_checkpoint  # conftest's dense lenet_300_100 checkpoint


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    """test_cli_llm_prune's tiny LLaMA directory (32 and 64 inputs per layer, 64 positions)
    beside calib.txt."""
    pytest.importorskip("transformers")
    from test_cli_llm_prune import _llama_dir

    return _llama_dir(tmp_path_factory.mktemp("llama"))


@pytest.fixture
def no_evaluation(monkeypatch):
    """Fail the test if ``llm-prune`` reaches its dense evaluation."""
    def evaluate(*_args, **_kwargs):
        raise AssertionError("the dense evaluation ran before the mistake was refused")

    monkeypatch.setattr(llm_prune, "_quality", evaluate)


def _llm_prune(capsys, llama: Path, out: Path, *flags: str) -> str:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return user_error(capsys, "llm-prune", str(llama), "--calib", str(llama.parent / "calib.txt"),
                      "--out", str(out), "--nsamples", "4", "--seqlen", "32", *flags)


# -- llm-prune: what only the model can judge, before the dense evaluation ------------------


@pytest.mark.parametrize(("flags", "expected"), [
    (["--pattern", "1:3"], "--pattern '1:3': pattern '1:3' needs the input dimension of "
                           "'model.layers.0.self_attn.q_proj.weight' to be a multiple of 3"),
    (["--quantize", "int8", "--group-size", "24"],
     "--group-size must divide the inputs of every pruned layer (one int8 scale per group, the "
     "groups of a row equal); 'model.layers.0.self_attn.q_proj.weight' has 32 inputs, got 24 "
     "(accepted: a divisor of 32, or no --group-size for one scale per row)"),
    (["--quantize", "int8", "--group-size", "64"], "has 32 inputs, got 64"),
])
def test_llm_prune_refuses_what_does_not_fit_a_layer_before_evaluating(
        capsys, tmp_path, llama, no_evaluation, flags, expected):
    """llm.prune refused them only after the dense model had been evaluated."""
    out = tmp_path / "out"
    assert expected in _llm_prune(capsys, llama, out, *flags)
    assert not out.exists()


def test_llm_prune_refuses_quantize_on_conv1d_layers_before_evaluating(capsys, tmp_path,
                                                                      no_evaluation):
    """GPT-2's Conv1D layers take no int8 grid: llm.prune said so after the evaluation."""
    transformers = pytest.importorskip("transformers")
    from sparsekit import llm

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=256, n_embd=32, n_layer=1, n_head=4,
                                     n_positions=64, bos_token_id=0, eos_token_id=0)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt")
    llm.byte_tokenizer().save_pretrained(tmp_path / "gpt")
    (tmp_path / "calib.txt").write_text(CALIB)
    out = tmp_path / "out"
    err = _llm_prune(capsys, tmp_path / "gpt", out, "--quantize", "int8")
    assert err.endswith("--quantize int8 needs nn.Linear layers (per-output-channel scales); "
                        "'transformer.h.0.attn.c_attn.weight' is a Conv1D: leave out --quantize")
    assert not out.exists()


def test_llm_prune_refuses_an_unusable_calibration_before_evaluating(capsys, tmp_path, llama,
                                                                    no_evaluation):
    """With --eval the --calib text was read first by llm.prune, after the evaluation; more
    windows than the memory holds were refused there too, naming "nsamples"."""
    out, text = tmp_path / "out", tmp_path / "eval.txt"
    text.write_text(CALIB)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    err = user_error(capsys, "llm-prune", str(llama), "--calib", str(empty), "--eval", str(text),
                     "--out", str(out))
    assert err.endswith("--calib: the text is empty")
    err = _llm_prune(capsys, llama, out, "--nsamples", str(10**15))
    assert "with --nsamples 1000000000000000: nsamples=1000000000000000 windows" in err
    assert "more than this machine's memory" in err
    assert not out.exists()


@pytest.mark.parametrize(("flags", "expected"), [
    (["--pattern", "2:4", "--allocation", "owl"],
     "--sparsity 0.5 --pattern 2:4 --allocation owl: allocation 'owl' needs pattern "
     "'unstructured'"),
    (["--pattern", "1:2", "--sparsity", "0.6"],
     "--sparsity 0.6 --pattern 1:2 --allocation uniform: sparsity 0.6 exceeds what pattern "
     "'1:2' gives"),
    (["--method", ""], "--method: unknown method ''; accepted: magnitude, sparsegpt, wanda"),
    (["--seqlen", "65"], "--seqlen: seqlen 65 exceeds the model's context of 64 tokens"),
])
def test_llm_prune_names_the_flag(capsys, tmp_path, llama, no_evaluation, flags, expected):
    out = tmp_path / "out"
    argv = ["llm-prune", str(llama), "--calib", str(llama.parent / "calib.txt"), "--out",
            str(out), *flags]
    assert expected in user_error(capsys, *argv)
    assert not out.exists()


def test_llm_prune_text_that_is_a_directory_is_named(capsys, tmp_path, llama):
    """It was "no such text file", for a directory that exists (and for "", the current
    directory)."""
    err = user_error(capsys, "llm-prune", str(llama), "--calib", str(tmp_path), "--out",
                     str(tmp_path / "out"))
    assert f"--calib: the text file {str(tmp_path)!r} is a directory" in err
    err = user_error(capsys, "llm-prune", str(llama), "--calib", str(llama.parent / "calib.txt"),
                     "--eval", "", "--out", str(tmp_path / "out"))
    assert err.endswith("--eval must be the path of a text file, got ''")


def test_llm_prune_calibrates_on_the_windows_llm_prune_draws(tmp_path, llama, capsys):
    """The windows are now drawn by the command (to refuse them early): the model pruned is
    the one llm.prune makes of the file itself."""
    transformers = pytest.importorskip("transformers")
    from sparsekit import llm

    out = tmp_path / "out"
    assert main(["llm-prune", str(llama), "--calib", str(llama.parent / "calib.txt"), "--out",
                 str(out), "--nsamples", "3", "--seqlen", "16", "--seed", "7"]) == 0
    capsys.readouterr()
    model = transformers.AutoModelForCausalLM.from_pretrained(llama)
    tokenizer = transformers.AutoTokenizer.from_pretrained(llama)
    llm.prune(model, llama.parent / "calib.txt", tokenizer=tokenizer, nsamples=3, seqlen=16,
              seed=7)
    pruned = sparsekit.from_pretrained(out).state_dict()
    for name, value in model.state_dict().items():
        assert torch.equal(pruned[name], value), name


# -- recipes: --check refuses what the run would -------------------------------------------


def _recipe(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(("stages", "message"), [
    ("prune: {sparsity: 0.5}\ncompile: {formats: [nm]}\n",
     "compile.formats: ['nm'] cannot hold the weight of any layer of 'lenet_300_100' (pruned "
     "unstructured); accepted: formats that fit them, 'auto', or a list including 'dense'"),
    ("prune: {sparsity: 0.5}\ncompile: {formats: [bsr, fanin]}\n", "['bsr', 'fanin'] cannot"),
    ("compile: {formats: [nm]}\n", "(not pruned by the recipe)"),
    ("prune: {sparsity: 0.5}\ncompile: {formats: [torch_csr], weight_dtype: int8}\n",
     "(pruned unstructured, values int8)"),
])
def test_recipe_check_refuses_formats_that_fit_no_layer(tmp_path, capsys, stages, message):
    """sparsekit.compile refused them only after the prune (and fine-tune) stages had run,
    and `sparsekit run --check` called the recipe valid."""
    path = _recipe(tmp_path, f"model: lenet_300_100\ninput_shape: [1, 784]\n{stages}")
    with pytest.raises(ValueError, match="compile.formats: "):
        load_recipe(path)
    assert message in user_error(capsys, "run", str(path), "--check")


def test_recipe_formats_that_fit_the_pruned_layers_pass(tmp_path, capsys):
    path = _recipe(tmp_path, "model: lenet_300_100\ninput_shape: [1, 784]\n"
                   "prune: {sparsity: 0.5, pattern: '2:4'}\ncompile: {formats: [nm]}\n")
    assert main(["run", str(path), "--check"]) == 0
    assert "valid recipe" in capsys.readouterr().out


def test_load_recipe_leaves_the_random_state_as_it_was(tmp_path):
    """Validating built the model, drawing its initial weights from the caller's generator."""
    path = _recipe(tmp_path, "model: lenet_300_100\ninput_shape: [1, 784]\n"
                   "prune: {sparsity: 0.5}\ncompile: {formats: [bitmap]}\n")
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    load_recipe(path)
    assert torch.equal(torch.rand(4), expected)


def test_recipe_out_in_a_directory_that_cannot_be_written(tmp_path, capsys, monkeypatch):
    """The save, the last stage, was the first to find out (as root the mode says nothing:
    the refusal by os.access is what is tested)."""
    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: os.fspath(p) != str(locked)
                        and real(p, mode, **kw))
    path = _recipe(tmp_path, "model: lenet_300_100\ninput_shape: [1, 784]\n"
                   f"prune: {{sparsity: 0.5}}\nout: {locked}/new/x.safetensors\n")
    with pytest.raises(ValueError, match=f"out: cannot write '{locked}/new/x.safetensors': "
                       f"the directory '{locked}' is not writable"):
        load_recipe(path)
    user_error(capsys, "run", str(path), "--check")
    assert list(locked.iterdir()) == []


def test_recipe_out_name_too_long_is_one_plain_reason(tmp_path):
    """It was "out: [Errno 36] File name too long: '<the path again>'"."""
    out = tmp_path / ("a" * 300) / "x.safetensors"
    path = _recipe(tmp_path, f"model: lenet_300_100\ninput_shape: [1, 784]\nout: {out}\n")
    with pytest.raises(ValueError) as err:
        load_recipe(path)
    assert str(err.value).endswith(f"out: cannot write {str(out)!r}: File name too long")


def test_load_recipe_refuses_out_that_is_the_recipe_itself(tmp_path):
    """run_recipe replaced the recipe file with the checkpoint (only the CLI refused it)."""
    path = tmp_path / "r.yaml"
    text = f"model: lenet_300_100\ninput_shape: [1, 784]\nout: {path}\n"
    path.write_text(text)
    with pytest.raises(ValueError,
                       match=r"out: '.*r\.yaml' is the input '.*r\.yaml'; write to another"):
        load_recipe(path)
    assert path.read_text() == text


def test_recipe_yaml_merge_keys(tmp_path, capsys):
    """``<<: *defaults`` is YAML (SafeLoader merges it); it was "not valid YAML (could not
    determine a constructor for the tag …merge)". A key repeated beside it is still refused."""
    path = _recipe(tmp_path, "model: lenet_300_100\ninput_shape: [1, 784]\n"
                   "prune: &p {sparsity: 0.5}\nfinetune:\n  <<: {epochs: 2, lr: 0.1}\n"
                   "  lr: 0.01\n")
    recipe = load_recipe(path)
    assert recipe.finetune.epochs == 2 and recipe.finetune.lr == 0.01
    path = _recipe(tmp_path, "model: lenet_300_100\n<<: {seed: 1}\nseed: 2\nseed: 3\n")
    assert "key 'seed' appears twice" in user_error(capsys, "run", str(path), "--check")


# -- every command -------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [
    ["prune", "x.safetensors", "--sparsity", "abc"],
    ["prune"],
    ["nosuch"],
    [],
    ["llm-prune", "m", "--calib", "c", "--out", "o", "--nsamples", "1.5"],
])
def test_a_command_line_argparse_refuses_is_one_line(capsys, argv):
    """argparse printed its whole usage text before the error."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ": error: " in err and "--help)" in err


def test_sigterm_unwinds_the_command(tmp_path, capsys, monkeypatch):
    """Python's default SIGTERM ended the process at once: demo (and llm-prune) left the
    temporary directory of their output beside --out."""
    from torch.utils.data import TensorDataset

    from sparsekit.cli import demo
    from sparsekit.data.images import ImageDataset

    split = TensorDataset(torch.randn(8, 1, 8, 8), torch.randint(0, 4, (8,)))
    tiny = ImageDataset(train=split, test=split, name="tiny", num_classes=4,
                        image_shape=(1, 8, 8))
    monkeypatch.setattr(demo, "load_image_dataset", lambda root: tiny)

    def killed(out, *_args):
        (out / "dense.safetensors").write_text("partial")
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not stop the command")

    monkeypatch.setattr(demo, "_runs", killed)
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text("earlier")
    handler = signal.getsignal(signal.SIGTERM)
    assert main(["demo", "--out", str(out), "--epochs", "1", "--sparsities", "0.5"]) == 143
    assert capsys.readouterr().err.strip() == "terminated"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in out.iterdir()] == ["results.json"]
    assert (out / "results.json").read_text() == "earlier"
    assert signal.getsignal(signal.SIGTERM) is handler


def test_prune_refuses_calib_batches_that_a_data_free_method_ignores(capsys, tmp_path, ckpt):
    out = tmp_path / "out.safetensors"
    err = user_error(capsys, "prune", str(ckpt), "--out", str(out), "--sparsity", "0.5",
                     "--calib-batches", "8")
    assert "--calib-batches applies to data-driven methods" in err
    assert "--method 'magnitude' reads no data" in err
    assert not out.exists()


@pytest.mark.parametrize("command", ["prune", "report"])
@pytest.mark.parametrize("model", ["", "nosuch"])
def test_an_unknown_model_names_the_flag(capsys, tmp_path, ckpt, command, model):
    extra = ["--sparsity", "0.5", "--dry-run"] if command == "prune" else []
    err = user_error(capsys, command, str(ckpt), "--model", model, *extra)
    assert f"--model {model!r} is neither a registered model nor module:factory; " \
           "accepted: lenet5, lenet_300_100, resnet_small, or module:factory" in err


@pytest.mark.parametrize("command", ["prune", "demo"])
def test_a_data_dir_without_the_dataset_names_the_flag(capsys, tmp_path, ckpt, command):
    """It was "root 'x' lacks the IDX files …", naming no flag (prune: after loading)."""
    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    argv = (["prune", str(ckpt), "--sparsity", "0.5", "--method", "snip", "--out",
             str(out / "p.safetensors")] if command == "prune" else ["demo", "--out", str(out)])
    err = user_error(capsys, *argv, "--data-dir", str(data))
    assert f"--data-dir {str(data)!r} lacks the IDX files train-images-idx3-ubyte" in err
    assert not out.exists()


def test_llm_prune_eval_text_of_one_token_names_the_flag(capsys, tmp_path, llama):
    """It was "seqlen must be an int ≥ 2, got 1", with --seqlen 32 given."""
    text = tmp_path / "one.txt"
    text.write_text("a")
    out = tmp_path / "out"
    err = _llm_prune(capsys, llama, out, "--eval", str(text))
    assert err.endswith(f"--eval: the text file {str(text)!r} holds 1 token(s); perplexity "
                        "needs at least 2 (it scores each token after the first)")
    assert not out.exists()


def test_recipe_yaml_11_base_60_and_octal_numbers_are_strings(tmp_path, capsys):
    """PyYAML (YAML 1.1) read ``2:4`` as the int 124 and ``010`` as the int 8."""
    path = _recipe(tmp_path, "model: lenet_300_100\ninput_shape: [1, 784]\n"
                   "prune: {sparsity: 0.5, pattern: 2:4}\n")
    assert load_recipe(path).prune.pattern == "2:4"
    path = _recipe(tmp_path, "model: lenet_300_100\ninput_shape: [1, 784]\nseed: 010\n")
    assert "seed: Input should be a valid integer, got '010'" in user_error(
        capsys, "run", str(path), "--check")
    path = _recipe(tmp_path, "model: lenet_300_100\ninput_shape: [1, 784]\nseed: 0x10\n"
                   "prune: {sparsity: 5e-1}\n")
    recipe = load_recipe(path)
    assert recipe.seed == 16 and recipe.prune.sparsity == 0.5


def test_output_to_a_closed_pipe_is_no_error(ckpt):
    """`sparsekit report CKPT --json | head -1`: once the reader was gone the command said
    "error: [Errno 32] Broken pipe" and exited 2, a user error; now it stops quietly with
    the status of a process ended by SIGPIPE (141), as `cat` does."""
    import subprocess
    import sys

    read, write = os.pipe()
    os.close(read)
    try:
        done = subprocess.run([sys.executable, "-m", "sparsekit.cli.main", "report", str(ckpt),
                               "--json"], stdout=write, stderr=subprocess.PIPE, timeout=300,
                              check=False)
    finally:
        os.close(write)
    assert done.returncode == 141, done.stderr
    assert done.stderr == b""


def test_run_names_a_directory_given_as_the_recipe(capsys, tmp_path):
    """It was "recipe 'x' does not exist or is not a file", for a directory that exists."""
    assert user_error(capsys, "run", str(tmp_path), "--check").endswith(
        f"{tmp_path} is a directory; a recipe is a YAML file")
    assert user_error(capsys, "run", str(tmp_path / "no.yaml")).endswith(
        f"recipe {str(tmp_path / 'no.yaml')!r} does not exist")
