"""sparsekit.sae.capture / metrics / loss_recovered on a tiny Hugging Face LLaMA and a BERT."""

import pytest
import torch

from sparsekit.sae import SAE, capture, loss_recovered, metrics, train

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config).eval()


def batches(n=4):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 64, (3, 16), generator=g) for _ in range(n)]


def test_capture_streams_chunks_and_stops_the_forward_early(llama):
    calls = []
    handle = llama.model.layers[1].register_forward_hook(lambda *a: calls.append(1))
    chunks = list(capture(llama, "model.layers.0.mlp", batches(), chunk_size=40))
    handle.remove()
    assert [c.shape for c in chunks] == [(40, 32)] * 4 + [(32, 32)]  # 4 x 48 rows
    assert not calls  # the layer after the hooked one never ran
    assert llama.training is False and torch.is_grad_enabled()


def test_capture_pairs_for_a_transcoder_and_drops_padding(llama):
    mask = torch.ones(3, 16, dtype=torch.long)
    mask[0, 10:] = 0
    batch = {"input_ids": batches(1)[0], "attention_mask": mask}
    (x, y), = capture(llama, "model.layers.0.post_attention_layernorm", batch,
                      target="model.layers.0.mlp")
    assert x.shape == y.shape == (48 - 6, 32)
    sae = SAE(32, 64, k=4, transcoder=True)
    train(sae, [(x, y)], steps=2, batch_size=16)


def test_names_that_do_not_exist_are_refused_before_running(llama):
    with pytest.raises(ValueError, match=r"module_name 'model.layers.0.mpl' is not a module.*"
                                         r"did you mean 'model.layers.0.mlp'"):
        capture(llama, "model.layers.0.mpl", batches())
    with pytest.raises(ValueError, match="target 'nope' is not a module"):
        capture(llama, "model.layers.0.mlp", batches(), target="nope")
    with pytest.raises(ValueError, match="site must be one of"):
        capture(llama, "model.layers.0.mlp", batches(), site="middle")
    with pytest.raises(ValueError, match="module_name 'x' is not a module"):
        loss_recovered(llama, "x", SAE(32, 64), batches())


def test_metrics_and_loss_recovered_on_a_trained_sae(llama):
    stream = capture(llama, "model.layers.0", batches(8), chunk_size=64)
    held = list(stream)
    sae = SAE(32, 128, "batchtopk", k=8)
    train(sae, held, steps=200, batch_size=64, lr=3e-3)
    m = metrics(sae, held)
    assert set(m) >= {"fvu", "l0", "dead_fraction", "dense_fraction", "density_histogram"}
    assert 0 <= m["fvu"] < 0.5 and 2 < m["l0"] < 20
    hist = m["density_histogram"]
    assert sum(hist["counts"]) + hist["dead"] == 128 and m["tokens"] == 8 * 48
    out = loss_recovered(llama, "model.layers.0", sae, batches(2))
    assert out["perplexity_sae"] == pytest.approx(torch.tensor(out["loss_sae"]).exp().item())
    assert out["loss_sae"] != out["loss_clean"]  # the reconstruction was spliced in
    out = loss_recovered(llama, "model.layers.0", identity(32), batches(2))
    assert out["loss_sae"] == pytest.approx(out["loss_clean"], abs=1e-5)
    assert out["loss_recovered"] == pytest.approx(1.0, abs=1e-3)


def test_loss_recovered_of_a_transcoder_zeroes_the_output_it_replaces(llama):
    """A transcoder reads the module's input (32 wide) and replaces its output (64 wide):
    the zero ablation zeroes that output (it once zeroed the input, of the wrong width, and
    blamed ``inputs``)."""
    sae = SAE(32, 48, "l1", d_out=64)
    name = "model.layers.0.mlp.up_proj"
    out = loss_recovered(llama, name, sae, batches(2))
    handle = llama.get_submodule(name).register_forward_hook(
        lambda _m, _a, y: torch.zeros_like(y))
    try:
        with torch.no_grad():
            zeroed = [llama(b).logits[:, :-1].float() for b in batches(2)]
    finally:
        handle.remove()
    loss = sum(torch.nn.functional.cross_entropy(z.transpose(1, 2), b[:, 1:], reduction="sum")
               for z, b in zip(zeroed, batches(2))) / (2 * 3 * 15)
    assert out["loss_zero"] == pytest.approx(float(loss), rel=1e-6)
    assert all(torch.isfinite(torch.tensor(v)) for v in out.values())


def identity(width):
    """An AbsTopK SAE that keeps every latent of an identity dictionary: x̂ = x."""
    sae = SAE(width, width, "abstopk", k=width)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(width))
        sae.W_dec.copy_(torch.eye(width))
    return sae


def test_metrics_of_a_perfect_reconstruction():
    sae = SAE(4, 4, "topk", k=4)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(4))
        sae.W_dec.copy_(torch.eye(4))
    x = torch.rand(10, 4) + 0.1
    m = metrics(sae, x)
    assert m["fvu"] < 1e-10 and m["l0"] == 4 and m["dead_fraction"] == 0
    assert m["dense_fraction"] == 1.0


def test_loss_recovered_compares_embeddings_of_an_encoder():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64)
    bert = transformers.BertModel(config).eval()
    batch = {"input_ids": batches(1)[0], "attention_mask": torch.ones(3, 16, dtype=torch.long)}
    out = loss_recovered(bert, "encoder.layer.0.output.dense", identity(32), batch)
    assert set(out) == {"cosine_sae", "cosine_zero"}
    assert out["cosine_sae"] == pytest.approx(1.0, abs=1e-5)
    assert out["cosine_zero"] < out["cosine_sae"]
