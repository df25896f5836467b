"""sparsekit.diff: per-tensor update sparsity between two models, state dicts or checkpoints."""

import copy
import json
import math

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import sparsekit
from sparsekit.cli.main import main
from sparsekit.diff import Diff, DiffRow
from sparsekit.finetune import masked_delta


def _pair(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    a = nn.Sequential(nn.Linear(8, 10), nn.ReLU(), nn.Linear(10, 4))
    b = copy.deepcopy(a)
    with torch.no_grad():
        b[0].weight[0, :3] += 1.0  # 3 of 80 entries
        b[2].bias[1] -= 0.5  # 1 of 4
    return a, b


def test_rows_count_changed_entries_density_and_relative_norm():
    a, b = _pair()
    result = sparsekit.diff(a, b)
    rows = {r.name: r for r in result.rows}
    assert list(rows) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert (rows["0.weight"].changed, rows["0.weight"].numel) == (3, 80)
    assert rows["0.weight"].density == pytest.approx(3 / 80)
    assert rows["0.weight"].relative_norm == pytest.approx(
        math.sqrt(3) / float(a[0].weight.detach().double().norm()), rel=1e-6)
    assert rows["2.bias"].changed == 1 and rows["2.weight"].changed == 0
    assert rows["2.weight"].relative_norm == 0.0
    totals = result.totals
    assert (totals["changed"], totals["numel"]) == (4, 80 + 10 + 40 + 4)
    assert [r.name for r in result.changed()] == ["0.weight", "2.bias"]


def test_state_dicts_files_and_directories_give_the_same_table(tmp_path):
    a, b = _pair(1)
    masks = sparsekit.prune(b, 0.5)
    pa, pb = sparsekit.save(a, tmp_path / "a.safetensors"), sparsekit.save(b, tmp_path / "b.sk",
                                                                           masks)
    def table(x, y):  # files list their tensors by name
        out = sparsekit.diff(x, y).to_dict()
        return sorted(out["rows"], key=lambda r: r["name"]), out["totals"]

    reference = table(a, b)
    assert table(a.state_dict(), b.state_dict()) == reference
    assert table(pa, pb) == reference
    assert table(str(pa), b) == reference
    assert reference[0][1]["changed"] >= 40  # half of 0.weight pruned


def test_hugging_face_directories(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(2)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(tmp_path / "dense")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    tuned = copy.deepcopy(model)
    training = masked_delta(tuned, 0.05, method="random")
    with torch.no_grad():
        for p in training.parameters():
            p.add_(1.0)  # moves every chosen entry
        training.masks.apply()
    training.merge()
    sparsekit.save_pretrained(tuned, tmp_path / "tuned")
    result = sparsekit.diff(tmp_path / "sharded", tmp_path / "tuned")
    assert result.totals["changed"] == training.trainable
    assert sparsekit.diff(tmp_path / "dense", tmp_path / "sharded").totals["changed"] == 0
    projections = [r for r in result.rows if r.name.endswith("proj.weight")]
    assert projections and all(r.density == pytest.approx(0.05, abs=0.01) for r in projections)


def test_atol_ignores_small_changes():
    a, b = _pair(3)
    with torch.no_grad():
        b[2].weight.add_(1e-6)
    assert sparsekit.diff(a, b).totals["changed"] == 4 + 40
    assert sparsekit.diff(a, b, atol=1e-4).totals["changed"] == 4


def test_nan_in_both_is_unchanged_and_in_one_is_changed():
    a = {"w": torch.tensor([1.0, math.nan, math.nan, 0.0])}
    b = {"w": torch.tensor([1.0, math.nan, 2.0, 0.0])}
    row = sparsekit.diff(a, b).rows[0]
    assert row.changed == 1
    assert DiffRow("z", (2,), 2, 1, 1.0, 0.0).relative_norm == math.inf


def test_json_of_an_update_to_an_all_zero_tensor_is_strict_json():
    # its relative norm is infinite; json.dumps wrote `Infinity`, which jq refuses
    a, b = {"w": torch.zeros(4), "v": torch.ones(2)}, {"w": torch.ones(4), "v": torch.ones(2)}
    result = sparsekit.diff(a, b)
    text = json.dumps(result.to_dict(), allow_nan=False)  # raises on inf / nan
    rows = {r["name"]: r for r in json.loads(text)["rows"]}
    assert rows["w"]["relative_norm"] is None and rows["v"]["relative_norm"] == 0.0
    assert result.rows[0].relative_norm == math.inf  # the Python value stays a float


def test_output_formats():
    result = sparsekit.diff(*_pair(4))
    text = result.to_markdown()
    assert text.splitlines()[0].startswith("| tensor | shape | entries | changed")
    assert "| **total** |" in text and str(result) == text
    assert json.loads(json.dumps(result.to_dict()))["totals"]["changed"] == 4
    assert len(result.to_rich().rows) == len(result.rows) + 1
    assert isinstance(result, Diff)


def test_cli_diff(tmp_path, capsys):
    a, b = _pair(5)
    pa, pb = sparsekit.save(a, tmp_path / "a.sk"), sparsekit.save(b, tmp_path / "b.sk")
    assert main(["diff", str(pa), str(pb), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["totals"]["changed"] == 4 and len(out["rows"]) == 4
    assert main(["diff", str(pa), str(pb), "--markdown", "--changed-only"]) == 0
    text = capsys.readouterr().out
    assert "0.weight" in text and "2.weight" not in text
    assert main(["diff", str(pa), str(pb)]) == 0
    assert "relative norm" in capsys.readouterr().out


# -- hostile input ------------------------------------------------------------------------

def test_different_names_are_refused():
    a, _ = _pair(6)
    other = nn.Sequential(nn.Linear(8, 10), nn.ReLU(), nn.Linear(10, 4), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"only in b \['3.bias', '3.weight'\]"):
        sparsekit.diff(a, other)


def test_different_shapes_are_refused():
    a, _ = _pair(7)
    other = nn.Sequential(nn.Linear(8, 10), nn.ReLU(), nn.Linear(10, 5))
    with pytest.raises(ValueError, match=r"'2.weight' is \(4, 10\) in a and \(5, 10\) in b"):
        sparsekit.diff(a, other)


def test_bad_sources_are_refused(tmp_path):
    a, _ = _pair(8)
    with pytest.raises(ValueError, match="does not exist"):
        sparsekit.diff(a, tmp_path / "missing")
    with pytest.raises(TypeError, match="b must be a model"):
        sparsekit.diff(a, 3)
    with pytest.raises(TypeError, match="not tensors"):
        sparsekit.diff(a, {"0.weight": [1.0]})
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"\x80")
    with pytest.raises(ValueError, match="never unpickles"):
        sparsekit.diff(a, tmp_path / "pickled")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no weights"):
        sparsekit.diff(tmp_path / "empty", a)
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError):
        sparsekit.diff(a, tmp_path / "junk.safetensors")


def _hf_dir(path, index: object, **shards: dict[str, torch.Tensor]):
    """A Hugging Face-style directory: ``index`` as model.safetensors.index.json, shards."""
    path.mkdir()
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    for name, tensors in shards.items():
        save_file(tensors, str(path / name))
    return path


def test_corrupt_hugging_face_weights_are_refused_naming_the_file(tmp_path):
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "model.safetensors").write_bytes(b"\x08" + bytes(7) + b"{}garbage")
    with pytest.raises(ValueError, match=r"corrupt/model\.safetensors is not a readable"):
        sparsekit.diff(tmp_path / "corrupt", {"w": torch.ones(2)})


@pytest.mark.parametrize("index, match", [
    ({}, "must hold a 'weight_map'.*got none"),
    ({"weight_map": ["w"]}, "must hold a 'weight_map'.*got a list"),
    ({"weight_map": {"w": 3}}, r"the shard of \['w'\] is not a file name"),
    ({"weight_map": {"w": "gone.safetensors"}}, "names shard 'gone.safetensors', which is not"),
    ({"weight_map": {"w": "../outside.safetensors"}}, "shard '../outside.safetensors' outside"),
    ({"weight_map": {"w": "s.safetensors", "b": "s.safetensors"}}, r"maps \['b'\] to shards"),
])
def test_bad_hugging_face_indexes_are_refused(tmp_path, index, match):
    save_file({"w": torch.ones(2)}, str(tmp_path / "outside.safetensors"))
    path = _hf_dir(tmp_path / "hf", index, **{"s.safetensors": {"w": torch.ones(2)}})
    with pytest.raises(ValueError, match=rf"b: '.*model\.safetensors\.index\.json'.*{match}"):
        sparsekit.diff({"w": torch.ones(2)}, path)


def test_absolute_shard_paths_are_refused(tmp_path):
    outside = tmp_path / "outside.safetensors"
    path = _hf_dir(tmp_path / "hf", {"weight_map": {"w": str(outside)}})
    with pytest.raises(ValueError, match="outside its directory"):
        sparsekit.diff({"w": torch.ones(2)}, path)


def test_a_tensor_in_two_shards_comes_from_the_one_the_weight_map_names(tmp_path):
    index = {"weight_map": {"w": "s1.safetensors", "b": "s2.safetensors"}}
    path = _hf_dir(tmp_path / "hf", index, **{"s1.safetensors": {"w": torch.zeros(2)},
                                              "s2.safetensors": {"w": torch.ones(2),
                                                                 "b": torch.ones(1)}})
    result = sparsekit.diff(path, {"w": torch.zeros(2), "b": torch.ones(1)})
    assert result.totals["changed"] == 0


@pytest.mark.parametrize("atol, error", [(-1.0, ValueError), (math.nan, ValueError),
                                         (math.inf, ValueError), (True, TypeError),
                                         ("0", TypeError)])
def test_bad_atol_is_refused(atol, error):
    with pytest.raises(error, match="atol"):
        sparsekit.diff(*_pair(9), atol=atol)


def test_cli_errors_are_one_line(tmp_path, capsys):
    a, _ = _pair(10)
    pa = sparsekit.save(a, tmp_path / "a.sk")
    assert main(["diff", str(pa), str(tmp_path / "nothing")]) == 2
    assert capsys.readouterr().err.startswith("sparsekit diff: error: b:")
