"""``--version``, ``report --json`` / ``--tokens`` / save_pretrained directories,
``prune --dry-run``."""

from __future__ import annotations

import json

import pytest
import torch

import sparsekit
from sparsekit.cli.main import main
from sparsekit.models import lenet_300_100


@pytest.fixture
def ckpt(tmp_path):
    torch.manual_seed(0)
    return sparsekit.save(lenet_300_100(), tmp_path / "dense.safetensors")


def test_version(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip().startswith(f"sparsekit {sparsekit.__version__}")


def test_report_json(ckpt, capsys):
    assert main(["report", str(ckpt), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    model = lenet_300_100()
    masks = sparsekit.load(model, ckpt)
    expected = sparsekit.report(model, torch.zeros(1, 1, 28, 28), masks=masks).to_dict()
    assert data == json.loads(json.dumps(expected, default=str))


def test_prune_dry_run_writes_nothing(ckpt, tmp_path, capsys):
    before = sorted(tmp_path.iterdir())
    out = tmp_path / "pruned.safetensors"
    assert main(["prune", str(ckpt), "--sparsity", "0.5", "--out", str(out), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "dry run" in text and "nothing written" in text and "fc1" in text
    assert sorted(tmp_path.iterdir()) == before
    assert main(["prune", str(ckpt), "--sparsity", "0.5", "--dry-run"]) == 0


def test_prune_without_out_or_dry_run(ckpt, capsys):
    assert main(["prune", str(ckpt), "--sparsity", "0.5"]) == 2
    assert "--out is required" in capsys.readouterr().err


def _llama_dir(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    return sparsekit.save_pretrained(model, tmp_path / "llama", sparsekit.prune(model, 0.5))


def test_report_of_a_save_pretrained_directory_with_tokens(tmp_path, capsys):
    directory = _llama_dir(tmp_path)
    assert main(["report", str(directory), "--tokens", "2,16", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    row = next(r for r in data["rows"] if r["name"] == "model.layers.0.mlp.down_proj")
    assert row["sparsity"] == pytest.approx(0.5) and row["dense_flops"] > 0
    assert main(["report", str(directory), "--markdown"]) == 0  # default tokens 1,128
    assert "down_proj" in capsys.readouterr().out


@pytest.mark.parametrize("tokens, needle", [
    ("1", "BATCH,SEQ"),
    ("a,b", "comma-separated integers"),
    ("0,4", "must be ≥ 1"),
])
def test_token_input_errors_are_one_line(tmp_path, capsys, tokens, needle):
    directory = _llama_dir(tmp_path)
    assert main(["report", str(directory), "--tokens", tokens]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and needle in err, err


def test_float_input_shape_for_a_token_model_names_tokens(tmp_path):
    """``--input-shape 1,128`` fed floats to a transformers model: a traceback."""
    from sparsekit.cli._errors import UsageError
    from sparsekit.cli._model import example_inputs

    model = sparsekit.from_pretrained(_llama_dir(tmp_path))
    with pytest.raises(UsageError, match="use --tokens"):
        example_inputs("1,128", model)


def test_demo_says_loudly_when_it_falls_back_to_digits(tmp_path, capsys, monkeypatch):
    from sparsekit.cli import demo

    monkeypatch.setenv("SPARSEKIT_DATA_DIR", str(tmp_path / "no-fashion-mnist"))
    out = tmp_path / "out"
    argv = ["demo", "--out", str(out), "--epochs", "1", "--finetune-epochs", "0",
            "--sparsities", "0.5", "--train-limit", "200"]
    assert main(argv) == 0
    assert "FALLBACK" in capsys.readouterr().out
    assert demo.FALLBACK in (out / "results.md").read_text()


def test_demo_table_headers_name_the_dataset_and_shout_the_digits_fallback():
    from sparsekit.cli import demo

    row = demo.Row("magnitude", 0.5, 0.8, 0.85, 100, 0.5, 0.9, speedup=1.5,
                   speedup_range=(1.4, 1.6))
    for dataset, loud in (("fashion-mnist", False), ("digits", True)):
        title = demo._table(0.9, [row], dataset).title
        header = demo._markdown(0.9, [row], dataset).splitlines()[0]
        assert dataset in title and dataset in header
        assert (demo.FALLBACK in title, demo.FALLBACK in header) == (loud, loud)
