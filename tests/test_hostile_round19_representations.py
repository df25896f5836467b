"""Round 19 of hostile inputs to the sparse representations (SAE, MoEfication): each case
failed raw, or silently, before its fix."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch import nn

from sparsekit.moe import balanced_kmeans
from sparsekit.sae import SAE, capture, load, loss_recovered, save, train


@pytest.mark.parametrize(("threshold", "dtype"), [
    (1e300, None),  # exp(log) is inf in float32: every code zero for good
    (1e5, torch.float16),
    (1e-300, None),  # exp(log) is 0: a plain ReLU
])
def test_a_jumprelu_threshold_the_dtype_cannot_hold_is_refused(threshold, dtype):
    with pytest.raises(ValueError, match=r"threshold must be positive and finite in "
                                         r"torch\.float\d+ .*got (1e|100000)"):
        SAE(8, 16, "jumprelu", threshold=threshold, dtype=dtype)


def test_a_jumprelu_threshold_in_range_still_builds():
    sae = SAE(8, 16, "jumprelu", threshold=1e-3, dtype=torch.bfloat16)
    assert bool(torch.isfinite(sae.jump_threshold).all())


def test_train_refuses_an_lr_it_would_ignore():
    sae = SAE(8, 16, k=4)
    optimizer = torch.optim.SGD(sae.parameters(), lr=0.1)
    before = {name: p.detach().clone() for name, p in sae.named_parameters()}
    with pytest.raises(ValueError, match=r"lr must be None when an optimizer is given.*"
                                         r"got lr=5\.0"):
        train(sae, torch.randn(32, 8), lr=5.0, optimizer=optimizer)
    assert optimizer.param_groups[0]["lr"] == 0.1 and not optimizer.state
    assert all(torch.equal(p, before[name]) for name, p in sae.named_parameters())


@pytest.mark.parametrize("name", ["cfg.json", "sae_weights.safetensors",
                                  "sparsekit_state.safetensors"])
def test_save_over_a_directory_in_place_of_a_file_keeps_the_old_save(tmp_path, name):
    sae = SAE(8, 16, k=4)
    save(sae, tmp_path)
    (tmp_path / name).unlink()
    (tmp_path / name).mkdir()
    kept = {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)
            if (tmp_path / f).is_file()}
    with pytest.raises(ValueError, match=f"path must be a directory .*holds '{name}' that is "
                                         f"not a file"):
        save(SAE(8, 16, k=4, seed=1), tmp_path)
    assert kept == {f: (tmp_path / f).read_bytes() for f in kept}


def test_save_names_a_path_under_a_file_or_a_broken_link_or_empty(tmp_path, monkeypatch):
    sae = SAE(8, 16, k=4)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="path must be a directory .*lies under .*a file"):
        save(sae, tmp_path / "file" / "sae")
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="is not a directory \\(a broken symbolic link\\)"):
        save(sae, tmp_path / "link")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="got '', which is empty"):
        save(sae, "")
    assert sorted(os.listdir(tmp_path)) == ["file", "link"]


def test_save_to_a_fresh_directory_still_round_trips(tmp_path):
    sae = SAE(8, 16, "jumprelu")
    loaded = load(save(sae, tmp_path / "a" / "b"))
    assert torch.equal(loaded.log_threshold, sae.log_threshold)


@pytest.mark.parametrize("scale", [3e37, 1e-30])
def test_balanced_kmeans_of_huge_or_tiny_values_clusters_as_unscaled(scale):
    points = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(balanced_kmeans(points * scale, 4), balanced_kmeans(points, 4))


class _Embedder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.out = nn.Linear(4, 4)

    def forward(self, input_ids, attention_mask=None):
        return self.out(self.embed(input_ids))


@pytest.mark.parametrize("mask", [[[1, 1, 0]], np.array([[1, 1, 0]])])
def test_capture_takes_an_attention_mask_that_is_not_a_tensor(mask):
    batch = {"input_ids": torch.tensor([[1, 2, 3]]), "attention_mask": mask}
    rows = next(capture(_Embedder(), "embed", batch))
    assert rows.shape == (2, 4)


def test_capture_names_an_attention_mask_of_another_shape():
    batch = {"input_ids": torch.tensor([[1, 2, 3]]), "attention_mask": torch.tensor([[1, 0]])}
    with pytest.raises(ValueError, match=r"inputs: attention_mask of shape \(1, 2\) does not "
                                         r"match the activations of shape \(1, 3, 4\)"):
        next(capture(_Embedder(), "embed", batch))


def test_loss_recovered_takes_an_attention_mask_that_is_a_list():
    torch.manual_seed(0)
    model, sae = _Embedder(), SAE(4, 8, k=2)
    ids = torch.tensor([[1, 2, 3]])
    as_list = loss_recovered(model, "embed", sae, {"input_ids": ids,
                                                   "attention_mask": [[1, 1, 0]]})
    as_tensor = loss_recovered(model, "embed", sae, {"input_ids": ids,
                                                     "attention_mask": torch.tensor([[1, 1, 0]])})
    assert as_list == as_tensor


def _routed_llama() -> tuple[nn.Module, torch.Tensor]:
    """A tiny LLaMA MoEfied by ``moefy``, and its calibration tokens."""
    transformers = pytest.importorskip("transformers")
    from sparsekit.moe import moefy

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=64)
    calibration = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    return moefy(transformers.LlamaForCausalLM(config).eval(), calibration, steps=2), calibration


def test_moefy_of_a_routed_model_says_so():
    from sparsekit.moe import contextual, moefy

    routed, calibration = _routed_llama()
    for call in (moefy, contextual):
        with pytest.raises(ValueError, match="model: 'model.layers.0.mlp' is routed already"):
            call(routed, calibration, steps=2)


@pytest.mark.parametrize("context", ["inference_mode", "frozen"])
def test_train_that_cannot_step_changes_nothing(context):
    sae = SAE(8, 16, k=4, init_norm=0.5)  # train renormalised the decoder before failing
    before = {name: t.clone() for name, t in sae.state_dict().items()}
    if context == "frozen":
        sae.requires_grad_(False)
        match, guard = "sae must have a parameter that requires grad", torch.enable_grad()
    else:
        match, guard = r"train cannot run inside torch\.inference_mode\(\)", torch.inference_mode()
    sae.eval()
    with guard, pytest.raises(ValueError, match=match):
        train(sae, torch.randn(32, 8))
    assert not sae.training
    assert all(torch.equal(t, before[name]) for name, t in sae.state_dict().items())


def test_train_under_no_grad_trains():  # the backward failed with a raw RuntimeError
    sae = SAE(8, 16, k=4)
    before = sae.W_enc.detach().clone()
    with torch.no_grad():
        assert train(sae, torch.randn(32, 8), batch_size=8)["steps"] == 4
    assert not torch.equal(sae.W_enc, before)
    assert not torch.is_inference_mode_enabled() and torch.is_grad_enabled()


def test_train_and_resample_name_an_sae_built_in_inference_mode():
    from sparsekit.sae import resample

    with torch.inference_mode():
        sae = SAE(8, 16, k=4)
    with pytest.raises(ValueError, match=r"sae\.W_dec is an inference tensor"):
        train(sae, torch.randn(32, 8))
    with pytest.raises(ValueError, match=r"sae\.W_dec is an inference tensor"):
        resample(sae, torch.randn(4, 8), torch.ones(16, dtype=torch.bool))


def test_relufy_and_distil_under_no_grad_fine_tune_and_name_inference_mode():
    transformers = pytest.importorskip("transformers")
    from sparsekit.moe import distil, moefy, relufy

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(config).eval()
    calibration = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    routed = moefy(model, calibration, steps=2)
    with torch.no_grad():
        relu = relufy(model, calibration, steps=2)
        tuned = distil(routed, model, calibration, steps=2)
    assert not torch.equal(relu.model.layers[0].mlp.down_proj.weight,
                           model.model.layers[0].mlp.down_proj.weight)
    assert any(not torch.equal(a, b) for a, b in zip(tuned.parameters(), routed.parameters()))
    with torch.inference_mode(), pytest.raises(ValueError, match=r"inside torch\.inference_mode"):
        relufy(model, calibration, steps=2)


@pytest.mark.parametrize("metadata", [{"a": {1: "x"}}, {"a": [{None: 1}]}])
def test_save_refuses_nested_metadata_keys_json_would_rename(tmp_path, metadata):
    from sparsekit._checks import ArgumentTypeError

    with pytest.raises(ArgumentTypeError, match="metadata keys must be str"):
        save(SAE(8, 16, k=4), tmp_path / "sae", metadata=metadata)
    assert not (tmp_path / "sae").exists()


def test_capture_keeps_a_float64_model_s_precision():
    model = nn.Sequential(nn.Linear(4, 4).double())
    x = torch.randn(3, 4, dtype=torch.float64)
    rows = next(capture(model, "0", x))
    assert rows.dtype == torch.float64 and torch.equal(rows, model(x).detach())
    half = next(capture(nn.Sequential(nn.Linear(4, 4).half()), "0", x.half()))
    assert half.dtype == torch.float32


def test_evaluate_names_data_the_model_turns_into_nan():
    from sparsekit.moe import evaluate

    routed, calibration = _routed_llama()
    assert all(v["error"] == v["error"] for v in evaluate(routed, calibration).values())
    with torch.no_grad():
        routed.model.embed_tokens.weight[5] = float("nan")
    data = calibration.clone()
    data[0, 0] = 5
    with pytest.raises(ValueError, match=r"data: the model's inputs to 'model\.layers\.0\.mlp' "
                                         r"on it must be finite, got \d+ NaN or inf"):
        evaluate(routed, data)


def test_capture_refuses_integer_activations():
    """Before: an embedding's input (token ids) was yielded as float "activations"."""
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4))
    ids = torch.randint(0, 10, (2, 3))
    with pytest.raises(ValueError, match=r"module_name: the module's input is a torch.int64 "
                                         r"tensor, not activations"):
        next(capture(model, "0", ids, site="input"))
    assert next(capture(model, "0", ids)).shape == (6, 4)  # its output is
