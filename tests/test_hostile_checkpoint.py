"""Hostile checkpoints (issue 17): every fault a red-team pass found, kept as a test.

A sealed file detects any changed byte; a file re-sealed by someone who edited it is still
checked for its structure, its indices, the masks' pattern and the model's shapes before
anything large is decoded; saves clean up after killed saves, are durable and
byte-reproducible.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _state import record_durability
from safetensors.torch import load as st_load
from torch import nn

import sparsekit
from sparsekit import MaskSet, checkpoint
from sparsekit.checkpoint import FORMAT_VERSION, STALE_TEMP_AGE_S, read, read_metadata
from sparsekit.cli.main import main as cli_main
from sparsekit.models import lenet_300_100

pytestmark = pytest.mark.usefixtures("one_thread")


def net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))


def masked(seed: int = 0) -> MaskSet:
    """``0.weight`` 95 % masked (stored as gaps), ``2.weight`` half masked (as a bitmap)."""
    model = net(seed)
    ms = MaskSet(model, {
        "0.weight": torch.rand(32, 16, generator=torch.Generator().manual_seed(1)) < 0.05,
        "2.weight": torch.arange(512).reshape(16, 32) % 2 == 0,
    })
    return ms.apply()


@pytest.fixture
def sealed(tmp_path) -> Path:
    ms = masked()
    path = sparsekit.save(ms.model, tmp_path / "m.sk", ms)
    infos = read(path).infos
    assert (infos["0.weight"].encoding, infos["2.weight"].encoding) == ("gaps", "bitmap")
    return path


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
        and torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a
    )


def assert_rejected(path: Path, match: str, model: nn.Module | None = None) -> None:
    model = model if model is not None else net(seed=7)
    before = state_of(model)
    with pytest.raises(ValueError, match=match):
        sparsekit.load(model, path)
    assert same(before, state_of(model))


def layout(raw: bytes) -> tuple[int, dict]:
    """Where the data section starts, and the safetensors header."""
    size = int.from_bytes(raw[:8], "little")
    return 8 + size, json.loads(raw[8:8 + size])


def region(raw: bytes, name: str) -> tuple[int, int]:
    start, header = layout(raw)
    begin, end = header[name]["data_offsets"]
    return start + begin, start + end


def flip(path: Path, at: int, mask: int = 0x01) -> None:
    raw = bytearray(path.read_bytes())
    raw[at] ^= mask
    path.write_bytes(bytes(raw))


def rewrite(path: Path, *, entries=None, parts=None, meta=None, reseal: bool = True) -> None:
    """Edit a checkpoint as a forger would and (by default) seal it again."""
    raw = path.read_bytes()
    stored = dict(st_load(raw))
    header = dict(layout(raw)[1]["__metadata__"])
    tensors = json.loads(header["tensors"])
    if entries is not None:
        tensors = entries(tensors)
    if parts is not None:
        parts(stored)
    if reseal and isinstance(tensors, dict):
        for key, entry in tensors.items():
            if isinstance(entry, dict) and "encoding" in entry:
                own = {n: t for n, t in stored.items() if n == key or n.startswith(f"{key}::")}
                entry["sha256"] = checkpoint._tensor_digest(own)
    header["tensors"] = json.dumps(tensors)
    if meta is not None:
        meta(header)
    if reseal:
        header["digest"] = checkpoint._header_digest(header)
    path.unlink()
    checkpoint._atomic_write(path, stored, header)


@pytest.fixture
def no_decode(monkeypatch):
    """Fail the test if any tensor of the file is decoded."""
    def refuse(key, *_args):
        raise AssertionError(f"{key!r} was decoded")

    monkeypatch.setattr(checkpoint, "_decode", refuse)


# -- any changed byte is detected -------------------------------------------------------------

def test_every_single_byte_flip_is_detected_or_harmless(sealed):
    """Each byte of the header (and every 7th of the data, whose regions are covered one by
    one below) flipped in turn: the load fails or gives exactly the saved weights."""
    ms = masked()
    raw = sealed.read_bytes()
    data_start = layout(raw)[0]
    harmless = []
    model = net(seed=7)  # a failed load leaves it as it was
    for at in [*range(data_start), *range(data_start, len(raw), 7)]:
        flip(sealed, at)
        try:
            loaded = sparsekit.load(model, sealed)
        except ValueError:
            pass
        else:
            assert at < data_start, f"a flip in the data at byte {at} loaded"
            assert same(state_of(model), state_of(ms.model)), at
            assert loaded.masks.keys() == ms.masks.keys()
            assert all(torch.equal(loaded.masks[k], ms.masks[k]) for k in ms.masks)
            harmless.append(at)
        sealed.write_bytes(raw)
    assert len(harmless) < 16  # only JSON whitespace (header padding) may change


@pytest.mark.parametrize("part", ["0.weight::values", "0.weight::gaps", "2.weight::values",
                                  "2.weight::bitmap", "0.bias", "2.bias"])
def test_flip_in_each_data_region_is_rejected(sealed, part):
    begin, end = region(sealed.read_bytes(), part)
    for at in (begin, (begin + end) // 2, end - 1):
        raw = sealed.read_bytes()
        flip(sealed, at, 0x80)
        assert_rejected(sealed, rf"tensor '{part.split('::')[0]}' does not match its header")
        sealed.write_bytes(raw)


@pytest.mark.parametrize("field", ["pattern", "format_version", "tensors", "user", "digest"])
def test_edited_metadata_field_is_rejected(tmp_path, field):
    ms = masked()
    path = sparsekit.save(ms.model, tmp_path / "m.sk", ms, metadata={"user": "abc"})
    edits = {
        "pattern": lambda m: m.update(pattern="2:4"),
        "format_version": lambda m: m.update(format_version="1"),
        "tensors": lambda m: m.update(tensors=m["tensors"].replace("[32, 16]", "[16, 32]")),
        "user": lambda m: m.update(user="abd"),
        "digest": lambda m: m.update(digest="0" * 64),
    }
    rewrite(path, meta=edits[field], reseal=False)
    # version 1 entries have no "sha256" field: the structure check sees the edit first
    assert_rejected(path, "digest mismatch|must be an object with the fields")


def test_swapped_tensors_are_rejected(tmp_path):
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    path = sparsekit.save(model, tmp_path / "s.sk")
    raw = bytearray(path.read_bytes())
    (a0, a1), (b0, b1) = region(raw, "0.weight"), region(raw, "1.weight")
    raw[a0:a1], raw[b0:b1] = raw[b0:b1], raw[a0:a1]
    path.write_bytes(bytes(raw))
    assert_rejected(path, r"tensor '[01].weight' does not match its header",
                    nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)))


def test_resealed_pattern_edit_is_rejected(tmp_path):
    """Resealed by a forger: the masks are checked against the declared pattern."""
    model = net()
    ms = sparsekit.prune(model, 0.5)  # unstructured: some groups of 4 keep 3 or 4
    path = sparsekit.save(model, tmp_path / "u.sk", ms)
    rewrite(path, meta=lambda m: m.update(pattern="2:4"))
    assert_rejected(path, r"mask of '0.weight' does not follow the declared pattern '2:4'")
    rewrite(path, meta=lambda m: m.update(pattern="block:3x3"))
    assert_rejected(path, r"pattern 'block:3x3' does not divide '0.weight'")
    rewrite(path, meta=lambda m: m.update(pattern="zigzag"))
    assert_rejected(path, "unknown pattern 'zigzag'")


def test_resealed_nnz_of_a_dense_tensor_is_rejected(tmp_path):
    """A dense tensor's nnz is checked against its data as save counts it (bitwise for a
    float parameter: -0.0 is a nonzero there, a plain zero in a bias): a resealed nnz of 5
    for a bias of 32 nonzeros loaded, and the header reported a false sparsity."""
    model = net()
    with torch.no_grad():
        model[0].weight[0, :3] = -0.0  # stored dense, its nnz counting them
        model[0].bias[:2] = -0.0  # counted as zeros
    path = sparsekit.save(model, tmp_path / "d.sk")
    assert read(path).infos["0.bias"].encoding == "dense"
    sparsekit.load(net(seed=7), path)  # as saved: both counts accepted
    rewrite(path, entries=lambda t: {**t, "0.bias": {**t["0.bias"], "nnz": 5}})
    assert_rejected(path, r"tensor '0\.bias' holds \d+ nonzeros, but its header entry says "
                          r"nnz 5")


def test_report_exits_2_on_a_flipped_file(tmp_path, capsys):
    model = lenet_300_100()
    ms = sparsekit.prune(model, 0.9)
    path = sparsekit.save(model, tmp_path / "l.sk", ms)
    assert cli_main(["report", str(path), "--markdown"]) == 0
    begin, _ = region(path.read_bytes(), "fc1.weight::values")
    flip(path, begin + 5)
    capsys.readouterr()
    assert cli_main(["report", str(path)]) == 2
    assert "does not match its header" in capsys.readouterr().err


# -- crafted (re-sealed) files ----------------------------------------------------------------

def test_huge_declared_shape_is_rejected_before_decoding(sealed, no_decode):
    def huge(entries):
        entries["0.weight"]["shape"] = [300_000_000]
        return entries

    rewrite(sealed, entries=huge)
    assert sealed.stat().st_size < 4096
    assert_rejected(sealed, r"tensor '0.weight' is \(300000000,\) torch.float32, the model has")
    assert json.loads(read_metadata(sealed)["tensors"])["0.weight"]["shape"] == [300_000_000]


def test_compressed_entry_of_another_shape_is_never_decoded(sealed, no_decode):
    def wider(entries):
        entries["2.weight"]["shape"] = [16, 64]
        return entries

    rewrite(sealed, entries=wider, parts=lambda p: p.update(
        {"2.weight::bitmap": torch.cat([p["2.weight::bitmap"], torch.zeros(64, dtype=torch.uint8)])}
    ))
    assert_rejected(sealed, r"tensor '2.weight' is \(16, 64\)")


def test_compressed_compiled_entry_is_decoded_only_where_the_model_fixes_it(tmp_path):
    """A compiled layer's size comes from the file; stored compressed (version 1, or crafted)
    it is decoded only into a model whose tensor of that name has the declared shape."""
    from sparsekit.engine import CompiledLinear, compile

    def model(fmt: str) -> nn.Module:
        torch.manual_seed(0)
        dense = lenet_300_100().eval()
        sparsekit.prune(dense, 0.5)
        compiled = compile(dense, formats="dense")
        compiled.fc1 = CompiledLinear.from_linear(dense.fc1, fmt)
        return compiled

    path = sparsekit.save(model("dense"), tmp_path / "c.sk")
    assert read(path).infos["fc1.format.weight"].encoding == "dense"  # a buffer: as it is

    def compress(parts):
        w = parts.pop("fc1.format.weight")
        keep = w.ne(0)
        encoding, own = checkpoint._encode(w, keep, int(keep.sum()), force=True)
        assert encoding == "bitmap"  # half dense
        parts.update({f"fc1.format.weight{suffix}": t for suffix, t in own.items()})

    rewrite(path, parts=compress, entries=lambda e: {**e, "fc1.format.weight": {
        **e["fc1.format.weight"], "encoding": "bitmap"}})
    same_formats = model("dense")
    sparsekit.load(same_formats, path)
    assert torch.equal(same_formats.fc1.format.weight, model("dense").fc1.format.weight)
    assert_rejected(path, "'fc1.format.weight' is stored compressed as \\(300, 784\\)",
                    model("torch_csr"))


def _gaps(values: list[int], dtype=torch.int32):
    def edit(parts):
        parts["0.weight::gaps"] = torch.tensor(values, dtype=dtype)
        parts["0.weight::values"] = torch.ones(len(values))
    return edit


def _nnz(n: int):
    def edit(entries):
        entries["0.weight"]["nnz"] = n
        return entries
    return edit


@pytest.mark.parametrize("gaps, match", [
    ([-6, 6, 10], "must be non-negative"),
    ([0, 6, 0], "positive after the first"),
    ([0, 500, 100], "stay below its 512 entries"),
])
def test_bad_gaps_are_rejected(sealed, gaps, match):
    rewrite(sealed, entries=_nnz(len(gaps)), parts=_gaps(gaps))
    assert_rejected(sealed, match)


def test_bitmap_padding_and_counts_are_checked(sealed):
    raw = sealed.read_bytes()

    def count_off(parts):
        parts["2.weight::bitmap"] = parts["2.weight::bitmap"].clone()
        parts["2.weight::bitmap"][0] ^= 2  # one more kept position than values

    rewrite(sealed, parts=count_off)
    assert_rejected(sealed, "257 positions for 256 values")

    sealed.write_bytes(raw)
    ms = MaskSet(nn.Linear(3, 3), {"weight": torch.eye(3, dtype=torch.bool)})
    path = sparsekit.save(ms.model, sealed.parent / "pad.sk", ms.apply())

    def padding(parts):
        parts["weight::bitmap"] = parts["weight::bitmap"].clone()
        parts["weight::bitmap"][1] |= 0x80  # bit 15 of a 9-entry bitmap
    assert read(path).infos["weight"].encoding == "bitmap"
    rewrite(path, parts=padding)
    assert_rejected(path, "bits set past its 9 entries", nn.Linear(3, 3))


@pytest.mark.parametrize("edit, match", [
    (lambda e: list(e.values()), "must be a JSON object of tensor entries, got a JSON list"),
    (lambda e: {**e, "0.bias": [1, 2]}, "'0.bias' must be an object with the fields"),
    (lambda e: {**e, "0.bias": {**e["0.bias"], "extra": 1}}, "'0.bias' must be an object"),
    (lambda e: {**e, "0.bias": {**e["0.bias"], "shape": [-32]}}, "non-negative integers"),
    (lambda e: {**e, "0.bias": {**e["0.bias"], "shape": [True]}}, "non-negative integers"),
    (lambda e: {**e, "0.bias": {**e["0.bias"], "dtype": "object"}}, "not a storable dtype"),
    (lambda e: {**e, "0.bias": {**e["0.bias"], "encoding": "rle"}}, "encoding 'rle'"),
    (lambda e: {**e, "0.bias": {**e["0.bias"], "nnz": 33}}, r"nnz must be an integer in \[0, 32\]"),
    (lambda e: {**e, "0.bias": {**e["0.bias"], "masked": True}}, "stored by position"),
    (lambda e: {k: v for k, v in e.items() if k != "0.bias"}, r"not described \['0.bias'\]"),
])
def test_malformed_header_gives_a_clear_error(sealed, edit, match):
    rewrite(sealed, entries=edit)
    assert_rejected(sealed, match)
    with pytest.raises(ValueError, match=match):
        read(sealed)


def test_tensors_entry_missing_or_not_json(sealed):
    raw = sealed.read_bytes()
    rewrite(sealed, meta=lambda m: m.pop("tensors"))
    assert_rejected(sealed, "the header has no 'tensors' entry")
    sealed.write_bytes(raw)
    rewrite(sealed, meta=lambda m: m.update(tensors="{not json"))
    assert_rejected(sealed, "'tensors' in the header is not valid JSON")


# -- models and paths -----------------------------------------------------------------------

def test_meta_device_model_is_refused(sealed):
    with torch.device("meta"):
        model = net()
    with pytest.raises(ValueError, match=r"meta device.*to_empty"):
        sparsekit.load(model, sealed)


def test_directory_and_device_paths_say_what_they_are(tmp_path):
    with pytest.raises(ValueError, match="is a directory, not a checkpoint file"):
        sparsekit.load(net(), tmp_path)
    if os.path.exists(os.devnull) and os.name != "nt":
        with pytest.raises(ValueError, match="is a character device, not a regular file"):
            sparsekit.load(net(), os.devnull)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read(tmp_path / "absent.sk")


# -- saves: stale temp files, durability, reproducibility, speed -----------------------------

def _aged(path: Path) -> Path:
    path.write_bytes(b"partial")
    old = time.time() - STALE_TEMP_AGE_S - 5
    os.utime(path, (old, old))
    return path


def test_save_removes_stale_temp_files_of_its_target_only(tmp_path):
    dead = 2**22 + 12345  # above Linux's pid_max: no such process
    stale = [_aged(tmp_path / f".m.sk.{dead}-abcd_123.tmp"), _aged(tmp_path / ".m.sk.x1y2z3w4.tmp")]
    kept = [
        _aged(tmp_path / f".m.sk.{os.getpid()}-abcdefgh.tmp"),  # a live writer (this process)
        tmp_path / f".m.sk.{dead}-recent00.tmp",  # too recent: its writer may be on another host
        _aged(tmp_path / f".other.sk.{dead}-abcdefgh.tmp"),  # another target
        _aged(tmp_path / ".m.sk.notours.tmp"),  # not our naming
    ]
    kept[1].write_bytes(b"partial")
    sparsekit.save(net(), tmp_path / "m.sk")
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in kept)
    assert sorted(os.listdir(tmp_path)) == sorted(["m.sk", *(p.name for p in kept)])


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="POSIX signals")
def test_a_save_killed_before_its_rename_is_cleaned_up_by_the_next(tmp_path):
    target = tmp_path / "k.sk"
    script = (
        "import os, signal, torch, sparsekit\n"
        "os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)\n"
        f"sparsekit.save(torch.nn.Linear(64, 64), {str(target)!r})\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(checkpoint.__file__).parents[1])}
    proc = subprocess.run([sys.executable, "-c", script], env=env, timeout=600)
    assert proc.returncode == -signal.SIGKILL
    (orphan,) = tmp_path.iterdir()
    assert orphan.name.startswith(".k.sk.") and orphan.name.endswith(".tmp")
    old = time.time() - STALE_TEMP_AGE_S - 5
    os.utime(orphan, (old, old))
    sparsekit.save(net(), target)
    assert os.listdir(tmp_path) == ["k.sk"]


@pytest.mark.skipif(not hasattr(os, "O_DIRECTORY"), reason="directories cannot be fsynced")
def test_directory_is_fsynced_after_the_rename(tmp_path, monkeypatch):
    events = record_durability(monkeypatch)
    sparsekit.save(net(), tmp_path / "d.sk")
    assert events == ["fsync file", "rename", "fsync dir"]


def test_saves_are_byte_reproducible(tmp_path):
    ms = masked()
    a = sparsekit.save(ms.model, tmp_path / "a.sk", ms, metadata={"x": "1", "a": "2", "m": "3"})
    b = sparsekit.save(ms.model, tmp_path / "b.sk", ms, metadata={"m": "3", "a": "2", "x": "1"})
    assert a.read_bytes() == b.read_bytes()
    fresh = net(seed=5)
    again = sparsekit.load(fresh, a)
    c = sparsekit.save(fresh, tmp_path / "c.sk", again, metadata={"a": "2", "m": "3", "x": "1"})
    assert c.read_bytes() == a.read_bytes()
    assert hashlib.sha256(a.read_bytes()).hexdigest() == hashlib.sha256(c.read_bytes()).hexdigest()


def test_dense_tensors_build_no_index(tmp_path, monkeypatch):
    def refuse(*_args):
        raise AssertionError("a bitmap was built for a dense tensor")

    monkeypatch.setattr(checkpoint, "_pack", refuse)
    model = lenet_300_100()  # no zeros: every encoding but dense loses
    path = sparsekit.save(model, tmp_path / "dense.sk")
    assert {i.encoding for i in read(path).infos.values()} == {"dense"}


def test_buffers_are_stored_as_they_are(tmp_path):
    model = net()
    model.register_buffer("table", torch.zeros(8, 8))
    path = sparsekit.save(model, tmp_path / "b.sk")
    assert read(path).infos["table"].encoding == "dense"
    assert read(path).infos["0.weight"].encoding == "dense"


def test_masked_negative_zero_message_counts_what_is_wrong(tmp_path):
    ms = masked()
    with torch.no_grad():
        w = ms.model[2].weight
        w[~ms.masks["2.weight"]] = -0.0
        w[0, 1] = 3.0  # masked position (odd column)
    with pytest.raises(ValueError, match=r"'2.weight' are not \+0.0 where masked: 1 nonzero and "
                                         r"255 -0.0 of 256 masked entries.*masks.apply\(\)") as err:
        sparsekit.save(ms.model, tmp_path / "z.sk", ms)
    assert "attach" not in str(err.value)
    assert os.listdir(tmp_path) == []


# -- the previous format version --------------------------------------------------------------

def _as_version_1(path: Path) -> None:
    def strip(entries):
        for entry in entries.values():
            del entry["sha256"]
        return entries

    def v1(meta):
        meta["format_version"] = "1"

    rewrite(path, entries=strip, meta=v1, reseal=False)
    raw = path.read_bytes()
    header = dict(layout(raw)[1]["__metadata__"])
    header["digest"] = hashlib.sha256(header["tensors"].encode()).hexdigest()
    path.unlink()
    checkpoint._atomic_write(path, dict(st_load(raw)), header)


def test_version_1_files_load_with_a_warning(sealed):
    assert FORMAT_VERSION == "3"
    _as_version_1(sealed)
    ms = masked()
    model = net(seed=7)
    with pytest.warns(UserWarning, match="format version 1.*not integrity-checked"):
        loaded = sparsekit.load(model, sealed)
    assert same(state_of(model), state_of(ms.model))
    assert all(torch.equal(loaded.masks[k], ms.masks[k]) for k in ms.masks)


def test_version_1_header_is_still_checked(sealed):
    _as_version_1(sealed)
    rewrite(sealed, meta=lambda m: m.update(tensors=m["tensors"].replace("[32, 16]", "[32, 17]")),
            reseal=False)
    assert_rejected(sealed, "header digest mismatch")


class _TiedLM(nn.Module):
    """An embedding whose weight is also the output head's (as GPT-2 / LLaMA tie them)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(64, 16)
        self.head = nn.Linear(16, 64, bias=False)
        self.head.weight = self.embed.weight


def test_tied_weights_are_stored_once_and_reload_tied(tmp_path):
    model = _TiedLM()
    path = sparsekit.save(model, tmp_path / "tied.sk")
    meta, infos = checkpoint.read_header(path)
    assert set(infos) == {"embed.weight"}
    assert json.loads(meta["tied"]) == {"head.weight": "embed.weight"}
    assert path.stat().st_size < 64 * 16 * 4 * 1.2  # one copy, not two
    other = _TiedLM()
    with torch.no_grad():
        other.embed.weight.zero_()
    sparsekit.load(other, path)
    assert other.head.weight is other.embed.weight
    assert torch.equal(other.embed.weight, model.embed.weight)
    assert torch.equal(read(path).state["head.weight"], model.head.weight)


@pytest.mark.parametrize("tied, match", [
    ({"head.weight": "nothing.weight"}, "'tied' in the header must map"),
    ({"embed.weight": "embed.weight"}, "'tied' in the header must map"),
    (["head.weight"], "'tied' in the header must map"),
])
def test_forged_tied_entry_is_rejected(tmp_path, tied, match):
    path = sparsekit.save(_TiedLM(), tmp_path / "tied.sk")
    rewrite(path, meta=lambda header: header.update(tied=json.dumps(tied)))
    assert_rejected(path, match, _TiedLM())


def test_metadata_cannot_overwrite_the_header(tmp_path):
    with pytest.raises(ValueError, match=r"metadata: keys \['tied'\]"):
        sparsekit.save(net(), tmp_path / "m.sk", metadata={"tied": "{}"})
    assert not (tmp_path / "m.sk").exists()


def test_version_2_files_load_as_before(sealed):
    """Version 3 only added the optional ``tied`` entry: a version-2 file loads unchanged."""
    rewrite(sealed, meta=lambda header: header.update(format_version="2"))
    ms, model = masked(), net(seed=7)
    sparsekit.load(model, sealed)
    assert same(state_of(model), state_of(ms.model))


def test_a_sealed_file_whose_format_entry_was_changed_is_refused(tmp_path):
    # one flipped byte in the format entry used to turn a sealed checkpoint into "plain
    # safetensors", loaded with no seal at all (and then any flipped data byte with it)
    model = lenet_300_100()
    masks = sparsekit.prune(model, 0.5)
    path = sparsekit.save(model, tmp_path / "m.safetensors", masks)
    raw = bytearray(path.read_bytes())
    at = raw.index(b'"format":"sparsekit"') + len('"format":"')
    raw[at] = ord("3")
    path.write_bytes(bytes(raw))
    target = lenet_300_100()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match="not an intact checkpoint.*format is '3parsekit'"):
        sparsekit.load(target, path)
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())


def test_save_under_a_file_is_a_value_error_naming_path(tmp_path) -> None:
    """A folder on the way that is an existing file was a raw NotADirectoryError of the
    folders' creation; now the path is refused first, as an existing directory is."""
    (tmp_path / "f").write_text("")
    with pytest.raises(ValueError, match=r"^path must be .* is a file, not a directory\)$"):
        sparsekit.save(nn.Linear(4, 4), tmp_path / "f" / "sub" / "ckpt.sk")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]
