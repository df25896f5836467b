"""YAML recipes: validation that names the field, and a run through every stage."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("pydantic")
pytest.importorskip("yaml")

from sparsekit.cli.main import main  # noqa: E402
from sparsekit.recipe import load_recipe, run_recipe  # noqa: E402

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "recipe.yaml"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_example_recipe_is_valid():
    recipe = load_recipe(EXAMPLE)
    assert recipe.prune.sparsity == 0.9 and recipe.finetune.schedule == "gradual"


@pytest.mark.parametrize("text, field", [
    ("model: lenet_300_100\nprune: {sparsity: 1.5}\n", "prune.sparsity"),
    ("model: lenet_300_100\nprune: {sparsity: 0.5, method: obs}\n", "prune.method"),
    ("model: lenet_300_100\nprune: {sparsity: 0.5, allocation: nope}\n", "prune.allocation"),
    ("model: lenet_300_100\nprune: {sparsity: 0.5, pattern: '5:4'}\n", "prune.pattern"),
    ("model: resnet9000\n", "model"),
    ("model: lenet_300_100\nfinetune: {epochs: 0}\n", "finetune.epochs"),
    ("model: lenet_300_100\nfinetune: {lr: -1}\n", "finetune.lr"),
    ("model: lenet_300_100\ncompile: {rows: [0]}\n", "compile.rows"),
    ("model: lenet_300_100\ncompile: {weight_dtype: int4}\n", "compile.weight_dtype"),
    ("model: lenet_300_100\nprune: {sparsity: 0.5, sparsty: 0.5}\n", "prune.sparsty"),
    ("model: lenet_300_100\ninput_shape: [1, 0]\n", "input_shape"),
    ("prune: {sparsity: 0.5}\n", "model"),
    ("model: lenet_300_100\ncompile: {formats: nonsense}\n", "compile.formats"),
    ("model: lenet_300_100\ncompile: {formats: []}\n", "compile.formats"),
    ("model: lenet_300_100\nprune: {sparsity: 0.5, exclude: [nothere]}\n", "prune.exclude"),
    ("model: lenet_300_100\nprune: {sparsity: 0.5, pattern: 'block:7x7'}\n", "prune.pattern"),
    ("model: lenet_300_100\ncheckpoint: nothere.safetensors\n", "checkpoint"),
    ("model: lenet_300_100\ninput_shape: [1, 3]\n", "input_shape"),
    ("model: lenet_300_100\nseed: 1000000000000000000000\n", "seed"),
    ("model: lenet_300_100\nseed: -1\n", "seed"),  # as every seed=: [0, 2**63 - 1]
    ("model: lenet_300_100\ncompile: {rows: [1, 2000000]}\n", "compile.rows"),  # MAX_ROWS
])
def test_every_field_error_names_the_field(tmp_path, text, field):
    with pytest.raises(ValueError, match=rf"{field}: "):
        load_recipe(_write(tmp_path, text))


@pytest.mark.parametrize("text, field, got", [
    ("model: lenet_300_100\nfinetune: {epochs: true}\n", "finetune.epochs", "True"),
    ("model: lenet_300_100\nfinetune: {epochs: 2.0}\n", "finetune.epochs", "2.0"),
    ("model: lenet_300_100\ncompile: {rows: [true]}\n", "compile.rows.0", "True"),
    ("model: lenet_300_100\ninput_shape: [true, 784]\n", "input_shape.0", "True"),
    ("model: lenet_300_100\nseed: 1.0\n", "seed", "1.0"),
    ("model: lenet_300_100\nreport: {markdown: 'yes'}\n", "report.markdown", "'yes'"),
    ("model: lenet_300_100\nprune: {sparsity: '0.5'}\n", "prune.sparsity", "'0.5'"),
    ("model: lenet_300_100\nprune: {sparsity: true}\n", "prune.sparsity", "True"),
])
def test_no_coercion_between_types(tmp_path, text, field, got):
    """Types are strict, as in the Python API: a bool is no number, a float no int."""
    with pytest.raises(ValueError, match=rf"{field}: .*, got {got}"):
        load_recipe(_write(tmp_path, text))


def test_repeated_key_is_refused(tmp_path):
    with pytest.raises(ValueError, match="key 'seed' appears twice"):
        load_recipe(_write(tmp_path, "model: lenet_300_100\nseed: 1\nseed: 2\n"))


def test_check_refuses_what_a_run_would(tmp_path, capsys):
    out = tmp_path / "pruned.safetensors"
    path = _write(tmp_path, f"model: lenet_300_100\nprune: {{sparsity: 0.5}}\n"
                            f"compile: {{formats: nonsense}}\nout: {out}\n")
    assert main(["run", "--check", str(path)]) == 2
    assert "compile.formats" in capsys.readouterr().err
    assert main(["run", str(path)]) == 2 and not out.exists()


def test_failed_stage_writes_no_out(tmp_path):
    """``out`` is written last: a stage that fails (here compile, which only finds out
    that bsr cannot hold int8 weights by trying) leaves nothing behind."""
    out = tmp_path / "pruned.safetensors"
    path = _write(tmp_path, f"model: lenet_300_100\nprune: {{sparsity: 0.5}}\n"
                            f"compile: {{formats: [bsr], weight_dtype: int8}}\nout: {out}\n")
    with pytest.raises(ValueError, match="cannot hold"):
        run_recipe(load_recipe(path), log=lambda _: None)
    assert not out.exists()


def test_gradual_without_a_prune_target(tmp_path):
    with pytest.raises(ValueError, match="gradual.*needs a prune stage"):
        load_recipe(_write(tmp_path, "model: lenet_300_100\nfinetune: {schedule: gradual}\n"))


def test_not_a_mapping_and_bad_yaml(tmp_path):
    with pytest.raises(ValueError, match="mapping of fields"):
        load_recipe(_write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ValueError, match="not valid YAML"):
        load_recipe(_write(tmp_path, "model: [\n"))
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00garbage")  # was a raw UnicodeDecodeError
    with pytest.raises(ValueError, match="binary.yaml: not a UTF-8 text file"):
        load_recipe(binary)


def test_cli_bad_recipe_is_one_line(tmp_path, capsys):
    path = _write(tmp_path, "model: lenet_300_100\nprune: {sparsity: 2}\n")
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "prune.sparsity" in err


def test_run_prune_compile_report_and_save(tmp_path, capsys):
    out = tmp_path / "pruned.safetensors"
    path = _write(tmp_path, f"model: lenet_300_100\nprune: {{sparsity: 0.8}}\n"
                            f"compile: {{formats: [dense, torch_csr], rows: [1]}}\n"
                            f"report: {{markdown: true}}\nout: {out}\n")
    assert main(["run", str(path)]) == 0
    text = capsys.readouterr().out
    assert "pruned to 80.00%" in text and "fc1" in text and out.is_file()


def test_run_gradual_finetune(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEKIT_DATA_DIR", str(tmp_path / "none"))  # digits: fast
    path = _write(tmp_path, "model: lenet_300_100\nprune: {sparsity: 0.5, exclude: [fc3]}\n"
                            "finetune: {epochs: 1, schedule: gradual, every: 2}\nreport: null\n")
    result = run_recipe(load_recipe(path), log=lambda _: None)
    assert result["masks"].sparsity() == pytest.approx(0.5, abs=0.01)
    assert "fc3.weight" not in result["masks"].masks  # exclude holds in the schedule too
    assert result["accuracy"] > 0.2
