"""Compressed checkpoints: bit-identical round trips, size, atomicity, and bad files."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import sparsekit
from sparsekit import MaskSet
from sparsekit.checkpoint import FORMAT, FORMAT_VERSION, TensorInfo, read

INT_VIEW = {
    torch.float32: torch.int32,
    torch.float64: torch.int64,
    torch.bfloat16: torch.int16,
    torch.float16: torch.int16,
}
LENET_WEIGHTS = ("0.weight", "2.weight", "4.weight")



pytestmark = pytest.mark.usefixtures("one_thread")


def lenet(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Sequential:
    """LeNet-300-100 as a plain MLP: Linear 784-300-100-10."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10)
    )
    return model.to(dtype)


def small(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


def bn_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10)
    )


def bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    return t.view(INT_VIEW[t.dtype]) if t.dtype in INT_VIEW else t


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert a[k].shape == b[k].shape, k
        assert torch.equal(bits(a[k]), bits(b[k])), k


def dense_size(model: nn.Module, path: Path) -> int:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path.stat().st_size


# -- round trips ----------------------------------------------------------------------------

@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.98])
def test_round_trip_is_bit_identical(tmp_path, sparsity):
    model = lenet()
    ms = sparsekit.prune(model, sparsity, allocation="global")
    w = model[2].weight
    kept = torch.nonzero(ms.masks["2.weight"]).tolist()
    with torch.no_grad():
        w[tuple(kept[0])] = 0.0  # a kept weight that happens to be exactly zero
        w[tuple(kept[1])] = -0.0
    path = sparsekit.save(model, tmp_path / "ckpt.sk", ms)
    assert path == tmp_path / "ckpt.sk"

    fresh = lenet(seed=1)
    loaded = sparsekit.load(fresh, path)
    assert isinstance(loaded, MaskSet)
    assert loaded.model is fresh
    assert_bitwise_equal(model.state_dict(), fresh.state_dict())
    assert sorted(loaded.masks) == sorted(ms.masks) == sorted(LENET_WEIGHTS)
    for n in LENET_WEIGHTS:
        assert torch.equal(loaded.masks[n], ms.masks[n]), n
        assert loaded.params[n] is dict(fresh.named_parameters())[n]
    assert loaded.masks["2.weight"][tuple(kept[0])]  # stored by position, not from zeros
    assert loaded.masks["2.weight"][tuple(kept[1])]
    assert loaded.pattern == ms.pattern == "unstructured"
    assert loaded.sparsity() == ms.sparsity() == pytest.approx(sparsity, abs=1e-5)


def test_round_trip_keeps_pattern(tmp_path):
    model = lenet()
    ms = sparsekit.prune(model, 0.5, pattern="2:4")
    sparsekit.save(model, tmp_path / "nm.sk", ms)
    fresh = lenet(seed=1)
    loaded = sparsekit.load(fresh, tmp_path / "nm.sk")
    assert ms.pattern == loaded.pattern == "2:4"
    assert_bitwise_equal(model.state_dict(), fresh.state_dict())
    for n in LENET_WEIGHTS:
        assert torch.equal(loaded.masks[n], ms.masks[n])
        assert (loaded.masks[n].reshape(-1, 4).sum(1) == 2).all()


def test_round_trip_with_batchnorm_buffers(tmp_path):
    model = bn_net()
    with torch.no_grad():
        for seed in range(3):  # train-mode forwards move running stats and the int64 counter
            model(torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(seed)))
    assert model[1].num_batches_tracked.dtype == torch.int64
    assert int(model[1].num_batches_tracked) == 3
    ms = sparsekit.prune(model, 0.7)
    assert sorted(ms.masks) == ["0.weight", "4.weight"]
    sparsekit.save(model, tmp_path / "bn.sk", ms)

    fresh = bn_net(seed=1)
    loaded = sparsekit.load(fresh, tmp_path / "bn.sk")
    assert_bitwise_equal(model.state_dict(), fresh.state_dict())
    assert int(fresh[1].num_batches_tracked) == 3
    for n in ("0.weight", "4.weight"):
        assert torch.equal(loaded.masks[n], ms.masks[n])
    infos = read(tmp_path / "bn.sk").infos
    assert infos["1.num_batches_tracked"].encoding == "dense"
    assert infos["1.num_batches_tracked"].dtype == "torch.int64"
    assert infos["1.running_var"].encoding == "dense"
    assert infos["0.weight"].shape == (8, 1, 3, 3)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_round_trip_other_dtypes(tmp_path, dtype):
    model = lenet(dtype=dtype)
    ms = sparsekit.prune(model, 0.9, allocation="global")
    sparsekit.save(model, tmp_path / "d.sk", ms)
    fresh = lenet(seed=1, dtype=dtype)
    loaded = sparsekit.load(fresh, tmp_path / "d.sk")
    assert fresh[0].weight.dtype == dtype
    assert_bitwise_equal(model.state_dict(), fresh.state_dict())
    for n in LENET_WEIGHTS:
        assert torch.equal(loaded.masks[n], ms.masks[n])
    assert {i.dtype for i in read(tmp_path / "d.sk").infos.values()} == {str(dtype)}


def test_fully_masked_and_fully_kept_layers(tmp_path):
    model = small()
    masks = {
        "0.weight": torch.zeros(32, 16, dtype=torch.bool),
        "2.weight": torch.ones(4, 32, dtype=torch.bool),
    }
    ms = MaskSet(model, masks).apply()
    sparsekit.save(model, tmp_path / "edge.sk", ms)
    infos = read(tmp_path / "edge.sk").infos
    assert (infos["0.weight"].nnz, infos["0.weight"].sparsity) == (0, 1.0)
    assert (infos["2.weight"].nnz, infos["2.weight"].sparsity) == (128, 0.0)
    # a mask is always stored, even where dense would be smaller
    assert infos["2.weight"].encoding in {"bitmap", "gaps"}
    fresh = small(seed=1)
    loaded = sparsekit.load(fresh, tmp_path / "edge.sk")
    assert_bitwise_equal(model.state_dict(), fresh.state_dict())
    for n, m in masks.items():
        assert torch.equal(loaded.masks[n], m)


# -- size -----------------------------------------------------------------------------------

def test_size_bound(tmp_path):
    sizes = {}
    for sparsity in (0.9, 0.98):
        model = lenet()
        ms = sparsekit.prune(model, sparsity)  # uniform: every layer at `sparsity`
        sizes[sparsity] = sparsekit.save(model, tmp_path / f"{sparsity}.sk", ms).stat().st_size
    dense = dense_size(lenet(), tmp_path / "dense.safetensors")
    assert dense > 266_610 * 4
    ratio = sizes[0.9] / dense
    assert ratio <= 0.2, f"90% sparse checkpoint is {ratio:.3f} of dense"
    assert sizes[0.98] < sizes[0.9]
    assert sizes[0.98] / dense <= 0.06


def test_gap_width_follows_largest_gap(tmp_path):
    model = nn.Sequential(nn.Linear(1000, 300))  # 300_000 entries
    cases = {"u8": [0, 255, 510], "u16": [0, 65_535], "i32": [0, 299_999]}
    expected = {"u8": torch.uint8, "u16": torch.uint16, "i32": torch.int32}
    for name, flat in cases.items():
        mask = torch.zeros(300_000, dtype=torch.bool)
        mask[flat] = True
        ms = MaskSet(model, {"0.weight": mask.reshape(300, 1000)}).apply()
        path = sparsekit.save(model, tmp_path / f"{name}.sk", ms)
        assert read(path).infos["0.weight"].encoding == "gaps"
        stored = load_file(str(path))
        assert stored["0.weight::gaps"].dtype == expected[name]
        gaps = torch.tensor(flat).diff(prepend=torch.tensor([0]))
        assert stored["0.weight::gaps"].tolist() == gaps.tolist()
        fresh = nn.Sequential(nn.Linear(1000, 300))
        loaded = sparsekit.load(fresh, path)
        assert torch.equal(loaded.masks["0.weight"], ms.masks["0.weight"])
        assert_bitwise_equal(model.state_dict(), fresh.state_dict())


# -- without masks ----------------------------------------------------------------------------

def _sparse_without_masks():
    model = lenet()
    sparsekit.prune(model, 0.9).remove()  # 90% zeros, no MaskSet any more
    with torch.no_grad():
        w = model[0].weight
        zeros = torch.nonzero(w == 0)[:20]
        w[zeros[:, 0], zeros[:, 1]] = -0.0
    return model, zeros


def test_save_without_masks_compresses_zeros(tmp_path):
    model, neg = _sparse_without_masks()
    path = sparsekit.save(model, tmp_path / "nomask.sk")
    assert path.stat().st_size < 0.2 * dense_size(model, tmp_path / "dense.safetensors")

    ckpt = read(path)
    assert ckpt.meta["pattern"] == "none"
    assert {k: i.encoding != "dense" for k, i in ckpt.infos.items()} == {
        "0.bias": False, "0.weight": True, "2.bias": False, "2.weight": True,
        "4.bias": False, "4.weight": True,
    }
    assert not any(i.masked for i in ckpt.infos.values())

    fresh = lenet(seed=1)
    loaded = sparsekit.load(fresh, path)
    assert_bitwise_equal(model.state_dict(), fresh.state_dict())
    assert torch.signbit(fresh[0].weight[neg[:, 0], neg[:, 1]]).all()
    assert (fresh[0].weight[neg[:, 0], neg[:, 1]] == 0).all()
    assert loaded.pattern == "unstructured"
    kept = read(path).kept  # positions come back from the file in any case
    for n in LENET_WEIGHTS:
        w = dict(model.named_parameters())[n].detach()
        assert torch.equal(kept[n], (w != 0) | torch.signbit(w)), n


def test_load_without_saved_masks_returns_masks_of_compressed_params(tmp_path):
    model, _ = _sparse_without_masks()
    path = sparsekit.save(model, tmp_path / "nomask.sk")
    loaded = sparsekit.load(lenet(seed=1), path)
    assert sorted(loaded.masks) == sorted(LENET_WEIGHTS)
    for n in LENET_WEIGHTS:
        w = dict(model.named_parameters())[n].detach()
        assert torch.equal(loaded.masks[n], (w != 0) | torch.signbit(w)), n
    assert loaded.layer_sparsity()["4.weight"] == 0.9
    assert loaded.layer_sparsity()["0.weight"] == pytest.approx(0.9 - 20 / 235_200)


def test_save_without_masks_keeps_dense_tensors_dense(tmp_path):
    model = lenet()  # no zeros at all
    path = sparsekit.save(model, tmp_path / "dense.sk", metadata={"run": "42"})
    ckpt = read(path)
    assert {i.encoding for i in ckpt.infos.values()} == {"dense"}
    assert ckpt.meta["run"] == "42"
    assert (ckpt.meta["format"], ckpt.meta["format_version"]) == (FORMAT, FORMAT_VERSION)
    fresh = lenet(seed=1)
    assert sparsekit.load(fresh, path).masks == {}
    assert_bitwise_equal(model.state_dict(), fresh.state_dict())


def test_plain_safetensors_loads_dense(tmp_path):
    model = lenet()
    sparsekit.prune(model, 0.9).remove()
    save_file(model.state_dict(), str(tmp_path / "plain.safetensors"))
    fresh = lenet(seed=1)
    loaded = sparsekit.load(fresh, tmp_path / "plain.safetensors")
    assert loaded.masks == {}
    assert loaded.sparsity() == 0.0
    assert_bitwise_equal(model.state_dict(), fresh.state_dict())
    infos = read(tmp_path / "plain.safetensors").infos
    assert {i.encoding for i in infos.values()} == {"dense"}
    assert infos["0.weight"].sparsity == pytest.approx(0.9)
    assert infos["0.bias"].sparsity == 0.0


# -- read -------------------------------------------------------------------------------------

def test_read_reports_encodings_and_sparsity(tmp_path):
    model = lenet()
    ms = sparsekit.prune(model, 0.9)
    path = sparsekit.save(model, tmp_path / "r.sk", ms)
    ckpt = read(path)
    assert sorted(ckpt.infos) == sorted(model.state_dict())
    assert sorted(ckpt.kept) == sorted(LENET_WEIGHTS)
    assert ckpt.meta["pattern"] == "unstructured"
    for k, info in ckpt.infos.items():
        assert info.encoding in {"bitmap", "gaps", "dense"}
        assert info.shape == tuple(model.state_dict()[k].shape)
        assert info.dtype == "torch.float32"
        assert torch.equal(bits(ckpt.state[k]), bits(model.state_dict()[k]))
    for n in LENET_WEIGHTS:
        assert ckpt.infos[n].masked
        assert ckpt.infos[n].sparsity == ms.layer_sparsity()[n]
        assert ckpt.infos[n].nnz == int(ms.masks[n].sum())
        assert torch.equal(ckpt.kept[n], ms.masks[n])
    assert ckpt.infos["0.weight"].sparsity == 1 - 23_520 / 235_200
    assert ckpt.infos["2.weight"].nnz == 3_000
    assert ckpt.infos["4.weight"].nnz == 100
    # values 4 B each; 1 B gaps beat a 1/8 B-per-entry bitmap at 10% density
    assert ckpt.infos["0.weight"].encoding == "gaps"
    assert ckpt.infos["0.bias"] == TensorInfo("dense", (300,), "torch.float32", 300, False)
    assert ckpt.infos["0.bias"].sparsity == 0.0


def test_read_picks_bitmap_at_half_density(tmp_path):
    model = lenet()
    ms = sparsekit.prune(model, 0.5)
    infos = read(sparsekit.save(model, tmp_path / "half.sk", ms)).infos
    assert {infos[n].encoding for n in LENET_WEIGHTS} == {"bitmap"}
    assert {infos[n].sparsity for n in LENET_WEIGHTS} == {0.5}
    stored = load_file(str(tmp_path / "half.sk"))
    assert stored["0.weight::bitmap"].dtype == torch.uint8
    assert stored["0.weight::bitmap"].numel() == 235_200 // 8
    assert stored["0.weight::values"].numel() == 117_600


# -- atomic writes ----------------------------------------------------------------------------

def test_save_leaves_no_temp_files(tmp_path):
    model = small()
    ms = sparsekit.prune(model, 0.5)
    sparsekit.save(model, tmp_path / "a.sk", ms)
    sparsekit.save(model, tmp_path / "a.sk", ms)  # overwrite
    sparsekit.save(model, str(tmp_path / "sub" / "dir" / "b.sk"), ms)  # creates parents
    assert sorted(os.listdir(tmp_path)) == ["a.sk", "sub"]
    assert os.listdir(tmp_path / "sub" / "dir") == ["b.sk"]


def test_failed_write_keeps_previous_file(tmp_path, monkeypatch):
    model = small()
    ms = sparsekit.prune(model, 0.5)
    path = sparsekit.save(model, tmp_path / "a.sk", ms)
    before = path.read_bytes()

    def fail(*_args, **_kwargs):
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "replace", fail)
    other = sparsekit.prune(small(seed=3), 0.9)
    with pytest.raises(OSError, match="disk on fire"):
        sparsekit.save(other.model, path, other)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["a.sk"]
    monkeypatch.undo()
    fresh = small(seed=1)
    sparsekit.load(fresh, path)
    assert_bitwise_equal(model.state_dict(), fresh.state_dict())


# -- bad input --------------------------------------------------------------------------------

@pytest.fixture
def saved(tmp_path):
    model = lenet()
    ms = sparsekit.prune(model, 0.9)
    return sparsekit.save(model, tmp_path / "good.sk", ms)


def _assert_load_fails(model, path, exc, match):
    before = snapshot(model)
    with pytest.raises(exc, match=match):
        sparsekit.load(model, path)
    assert_bitwise_equal(before, model.state_dict())


def test_another_architecture_is_rejected(saved):
    torch.manual_seed(0)
    wider = nn.Sequential(
        nn.Linear(784, 200), nn.ReLU(), nn.Linear(200, 100), nn.ReLU(), nn.Linear(100, 10)
    )
    _assert_load_fails(
        wider, saved, ValueError,
        r"tensor '0.bias' is \(300,\) torch.float32, the model has \(200,\)",
    )

    class Named(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(784, 300), nn.Linear(300, 100)
            self.fc3 = nn.Linear(100, 10)

    _assert_load_fails(
        Named(), saved, ValueError, r"another architecture\?\): missing \['fc1.bias', 'fc1.weight'"
    )
    _assert_load_fails(
        lenet(dtype=torch.float64), saved, ValueError, "torch.float32, the model has"
    )
    _assert_load_fails(small(), saved, ValueError, "does not match this model")


@pytest.mark.parametrize("cut", ["half", "last10"])
def test_truncated_file_is_rejected(saved, cut):
    raw = saved.read_bytes()
    saved.write_bytes(raw[: len(raw) // 2] if cut == "half" else raw[:-10])
    _assert_load_fails(lenet(seed=1), saved, ValueError, "not a readable safetensors checkpoint")


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"\xff" * 64])
def test_garbage_file_is_rejected(tmp_path, content):
    path = tmp_path / "junk.sk"
    path.write_bytes(content)
    _assert_load_fails(lenet(seed=1), path, ValueError, "not a readable safetensors checkpoint")


def _header(raw: bytes) -> dict[str, str]:
    size = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + size])["__metadata__"]


def test_tampered_header_is_rejected(saved):
    raw = saved.read_bytes()
    assert raw.count(b"[300, 784]") == 1  # the shape inside the 'tensors' metadata text
    tampered = raw.replace(b"[300, 784]", b"[300, 785]")
    assert len(tampered) == len(raw)
    saved.write_bytes(tampered)
    _assert_load_fails(lenet(seed=1), saved, ValueError, "header digest mismatch")
    with pytest.raises(ValueError, match="digest mismatch"):
        read(saved)


def test_tampered_header_with_forged_digest_is_rejected(saved):
    raw = saved.read_bytes()
    meta = _header(raw)
    assert '"0.bias": {"dtype": "torch.float32", "encoding": "dense"' in meta["tensors"]
    # a dense tensor that claims another shape: caught by the per-tensor consistency checks
    forged = meta["tensors"].replace('"shape": [300]}', '"shape": [301]}')
    digest = hashlib.sha256(forged.encode()).hexdigest().encode()
    tampered = raw.replace(b'"shape\\": [300]}', b'"shape\\": [301]}')
    tampered = tampered.replace(meta["digest"].encode(), digest)
    assert len(tampered) == len(raw) and tampered != raw
    saved.write_bytes(tampered)
    _assert_load_fails(lenet(seed=1), saved, ValueError, "'0.bias' does not match its header")


def test_unsupported_format_version_is_rejected(tmp_path):
    model = small()
    future = str(int(FORMAT_VERSION) + 1)  # version 2 is the current one since issue 17
    save_file(
        model.state_dict(), str(tmp_path / "v3.sk"),
        metadata={"format": FORMAT, "format_version": future},
    )
    _assert_load_fails(small(seed=1), tmp_path / "v3.sk", ValueError, f"format version '{future}'")


def test_missing_file(tmp_path):
    _assert_load_fails(small(), tmp_path / "nope.sk", FileNotFoundError, "nope.sk")


def test_save_rejects_nonzero_masked_weights(tmp_path):
    model = small()
    ms = sparsekit.prune(model, 0.5)
    with torch.no_grad():
        model[2].weight.add_(1.0)
    with pytest.raises(ValueError, match=r"'2.weight' are not \+0.0 where masked.*masks.apply\(\)"):
        sparsekit.save(model, tmp_path / "x.sk", ms)
    assert os.listdir(tmp_path) == []


def test_save_and_load_type_errors(tmp_path):
    model = small()
    with pytest.raises(TypeError, match="nn.Module"):
        sparsekit.save(model.state_dict(), tmp_path / "x.sk")
    with pytest.raises(TypeError, match="MaskSet"):
        sparsekit.save(model, tmp_path / "x.sk", {"0.weight": torch.ones(32, 16, dtype=bool)})
    path = sparsekit.save(model, tmp_path / "ok.sk")
    with pytest.raises(TypeError, match="nn.Module"):
        sparsekit.load(model.state_dict(), path)
    assert os.listdir(tmp_path) == ["ok.sk"]


def test_load_uses_no_pickle(saved, monkeypatch):
    def boom(*_args, **_kwargs):
        raise AssertionError("pickle used on the load path")

    monkeypatch.setattr(pickle, "loads", boom)
    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "Unpickler", boom)
    monkeypatch.setattr(torch, "load", boom)
    fresh = lenet(seed=1)
    loaded = sparsekit.load(fresh, saved)
    assert sorted(loaded.masks) == sorted(LENET_WEIGHTS)
    assert (fresh[0].weight[~loaded.masks["0.weight"]] == 0).all()


# -- regressions: masks that do not fit the model, -0.0, unmasked zeros, file mode --------------

def test_load_returns_only_the_saved_masks(tmp_path):
    model = small()
    ms = sparsekit.prune(model, 0.8, targets=["0"])
    with torch.no_grad():
        model[2].weight.zero_()  # e.g. a zero-initialised head, not pruned
    sparsekit.save(model, tmp_path / "z.sk", ms)
    infos = read(tmp_path / "z.sk").infos
    assert (infos["2.weight"].encoding, infos["2.weight"].masked) == ("gaps", False)
    fresh = small(seed=1)
    loaded = sparsekit.load(fresh, tmp_path / "z.sk")
    assert sorted(loaded.masks) == ["0.weight"]
    assert torch.equal(loaded.masks["0.weight"], ms.masks["0.weight"])
    assert_bitwise_equal(model.state_dict(), fresh.state_dict())


def test_masked_negative_zero_is_rejected(tmp_path):
    model = small()
    dense = model[0].weight.detach().clone()
    ms = sparsekit.prune(model, 0.5)
    with torch.no_grad():  # manual masking (w * mask) gives -0.0 where w < 0
        model[0].weight.copy_(dense * ms.masks["0.weight"])
    assert torch.signbit(model[0].weight[~ms.masks["0.weight"]]).any()
    with pytest.raises(ValueError, match=r"'0.weight' are not \+0.0 where masked"):
        sparsekit.save(model, tmp_path / "nz.sk", ms)
    assert os.listdir(tmp_path) == []
    ms.apply()  # +0.0 everywhere masked: saves, and round-trips bit for bit
    sparsekit.save(model, tmp_path / "nz.sk", ms)
    fresh = small(seed=1)
    sparsekit.load(fresh, tmp_path / "nz.sk")
    assert_bitwise_equal(model.state_dict(), fresh.state_dict())


def test_save_rejects_masks_of_another_shape(tmp_path):
    other = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    ms = sparsekit.prune(other, 0.5)
    with pytest.raises(ValueError, match=r"'0.weight' \(32, 8\) does not fit the model's "
                                         r"tensor of shape \(32, 16\)"):
        sparsekit.save(small(), tmp_path / "x.sk", ms)
    assert os.listdir(tmp_path) == []


def test_save_rejects_masks_with_unknown_names(tmp_path):
    class Named(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 4)

    ms = sparsekit.prune(Named(), 0.5)
    with pytest.raises(ValueError, match=r"'fc1.weight' \(32, 16\) matches no tensor"):
        sparsekit.save(small(), tmp_path / "x.sk", ms)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_saved_file_respects_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        path = sparsekit.save(small(), tmp_path / "perm.sk")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
