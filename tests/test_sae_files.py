"""sparsekit.sae.save/load: SAELens's layout, read by SAELens itself and read back from it."""

import json

import pytest
import torch

from sparsekit.sae import SAE, load, save, train

pytestmark = pytest.mark.usefixtures("one_thread")


def trained(activation, **kwargs):
    sae = SAE(16, 48, activation, k=4, seed=2, threshold=0.05, **kwargs)
    x = torch.randn(512, 16) @ torch.randn(16, 16)
    target = [(x, x[:, :kwargs["d_out"]] * 2)] if "d_out" in kwargs else x
    train(sae, target, steps=20, batch_size=128, lr=1e-2, sparsity_coef=1e-3)
    with torch.no_grad():  # a non-zero decoder bias and thresholds the round trip must keep
        sae.b_dec.add_(0.1)
    return sae, x


@pytest.mark.parametrize("activation", ["topk", "batchtopk", "abstopk", "jumprelu", "l1"])
def test_round_trip_keeps_codes_and_reconstructions(tmp_path, activation):
    sae, x = trained(activation, matryoshka=(12, 48) if activation == "topk" else None)
    save(sae, tmp_path, metadata={"hook_name": "encoder.layer.2"})
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["d_sae"] == 48 and cfg["metadata"]["hook_name"] == "encoder.layer.2"
    back = load(tmp_path)
    assert (back.activation, back.k, back.matryoshka) == (sae.activation, sae.k, sae.matryoshka)
    sae.eval()
    with torch.no_grad():
        assert torch.equal(back.encode(x), sae.encode(x))
        assert torch.equal(back(x), sae(x))


def sae_lens_module():
    """SAELens itself (the ``sae`` extra, also in ``dev``); its interop tests skip without it."""
    return pytest.importorskip("sae_lens")


@pytest.mark.parametrize(("activation", "architecture"), [
    ("topk", "topk"), ("abstopk", "abstopk"), ("batchtopk", "jumprelu"),
    ("jumprelu", "jumprelu"), ("l1", "standard")])
def test_sae_lens_loads_a_sparsekit_sae(tmp_path, activation, architecture):
    sae_lens = sae_lens_module()
    sae, x = trained(activation)
    sae.eval()
    save(sae, tmp_path)
    theirs = sae_lens.SAE.load_from_disk(tmp_path)
    assert theirs.cfg.architecture() == architecture
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(x), sae.encode(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(theirs.decode(sae.encode(x)), sae.decode(sae.encode(x)),
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(theirs(x), sae(x), atol=1e-5, rtol=1e-5)


def test_sae_lens_loads_a_sparsekit_transcoder(tmp_path):
    sae_lens = sae_lens_module()
    sae, x = trained("jumprelu", d_out=8)
    save(sae, tmp_path)
    theirs = sae_lens.SAE.load_from_disk(tmp_path)
    assert theirs.cfg.architecture() == "jumprelu_transcoder"
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), sae(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("architecture", ["topk", "jumprelu", "standard"])
def test_sparsekit_loads_a_sae_lens_sae(tmp_path, architecture):
    sae_lens_module()
    from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig
    from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig
    from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

    kinds = {"topk": (TopKSAE, TopKSAEConfig, {"k": 5, "rescale_acts_by_decoder_norm": True}),
             "jumprelu": (JumpReLUSAE, JumpReLUSAEConfig, {}),
             "standard": (StandardSAE, StandardSAEConfig, {})}
    cls, config, extra = kinds[architecture]
    torch.manual_seed(0)
    theirs = cls(config(d_in=16, d_sae=40, **extra))
    with torch.no_grad():  # non-trivial biases, thresholds and decoder norms
        for p in theirs.parameters():
            p.add_(torch.rand_like(p) * 0.1)
    theirs.save_model(tmp_path)
    ours = load(tmp_path)
    x = torch.randn(32, 16)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(x), theirs.encode(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)


def test_bad_files_and_unsaveable_saes_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no cfg.json"):
        load(tmp_path)
    with pytest.raises(ValueError, match="SAELens has no topk transcoder"):
        save(SAE(16, 32, d_out=8), tmp_path / "t")
    assert not (tmp_path / "t").exists()
    save(SAE(16, 32), tmp_path / "g")
    cfg = json.loads((tmp_path / "g" / "cfg.json").read_text())
    (tmp_path / "g" / "cfg.json").write_text(json.dumps({**cfg, "architecture": "gated"}))
    with pytest.raises(ValueError, match="architecture 'gated' is not supported"):
        load(tmp_path / "g")


def test_a_topk_sae_whose_cfg_says_k_0_is_refused(tmp_path):
    # `cfg.get("k") or ...` read k: 0 as missing and loaded the SAE with its own k instead
    save(SAE(16, 32, k=4), tmp_path / "k")
    cfg = json.loads((tmp_path / "k" / "cfg.json").read_text())
    (tmp_path / "k" / "cfg.json").write_text(json.dumps({**cfg, "k": 0}))
    with pytest.raises(ValueError, match="k"):
        load(tmp_path / "k")


def _edited(tmp_path, edit):
    """A saved TopK SAE (k=4) whose cfg.json ``edit`` changed in place."""
    path = save(SAE(16, 32, k=4), tmp_path / "e")
    cfg = json.loads((path / "cfg.json").read_text())
    edit(cfg)
    (path / "cfg.json").write_text(json.dumps(cfg))
    return path


@pytest.mark.parametrize("edit, match", [
    (lambda c: (c.pop("k"), c["sparsekit"].pop("k")),
     r"cfg.json: no k \(or sparsekit.k\), which a topk SAE needs"),
    (lambda c: c.update(k=8), r"cfg.json: k \(8\) and sparsekit.k \(4\) must agree"),
    (lambda c: c["sparsekit"].update(activation=["topk"]),
     r"cfg.json: sparsekit.activation must be a string \(topk, .*\), got \['topk'\]"),
    (lambda c: c["sparsekit"].update(transcoder="no"),
     r"cfg.json: sparsekit.transcoder must be a JSON bool \(true or false\), got 'no'"),
    (lambda c: c["sparsekit"].update(transcoder=1),
     r"cfg.json: sparsekit.transcoder must be a JSON bool \(true or false\), got 1"),
    (lambda c: c.update(dtype="bfloat16"),
     r"sae_weights.safetensors: W_enc is torch.float32, but cfg.json says dtype 'bfloat16', "
     r"which would round it"),
])
def test_a_tampered_cfg_is_refused_naming_the_file_and_field(tmp_path, edit, match):
    """Each loaded without a word or failed raw: no k loaded as k=1, a top-level k beside
    another sparsekit.k won, a list activation was an unhashable TypeError, a "no"
    transcoder was true (and the error blamed the activation), a bfloat16 dtype over float32
    tensors rounded the weights."""
    with pytest.raises(ValueError, match=match):
        load(_edited(tmp_path, edit))


def test_a_cfg_dtype_that_holds_the_tensors_exactly_loads(tmp_path):
    """SAELens saves a half() SAE's float16 tensors under its float32 dtype and loads them
    widened: so does sparsekit (only a dtype that would round them is refused)."""
    sae = SAE(16, 32, k=4).half()
    path = save(sae, tmp_path / "h")
    cfg = json.loads((path / "cfg.json").read_text())
    (path / "cfg.json").write_text(json.dumps({**cfg, "dtype": "float32"}))
    loaded = load(path)
    assert loaded.W_enc.dtype == torch.float32
    assert torch.equal(loaded.W_enc, sae.W_enc.float())


def test_a_save_that_fails_before_its_renames_leaves_the_directory_as_it_was(tmp_path,
                                                                          monkeypatch):
    from sparsekit import _atomic

    save(SAE(16, 32), tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    real = _atomic._fsync

    def failing(file):  # the weights' flush fails, as on a failing disk
        if "sae_weights" in file.name:
            raise OSError(5, "Input/output error")
        real(file)

    monkeypatch.setattr(_atomic, "_fsync", failing)
    with pytest.raises(OSError, match="Input/output"):
        save(SAE(16, 32, k=4), tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    load(tmp_path)
