"""Hostile inputs, round 21: attention patterns and coverage, structured removal, structure
features, reports and the files of save_pretrained / checkpoints."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

import sparsekit
from sparsekit._checks import ArgumentTypeError, memory_bytes
from sparsekit.attention import resolve_pattern, visible_pairs
from sparsekit.graph import structure_features, to_graph
from sparsekit.pretrained import WEIGHTS_NAME
from sparsekit.structured import dependency_groups
from sparsekit.structured.shrink import check_removal, remove_channels, shrink

transformers = pytest.importorskip("transformers")


def _llama(layers: int = 1) -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM._from_config(config).eval()


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    after = model.state_dict()
    return after.keys() == before.keys() and all(
        torch.equal(after[k], v) for k, v in before.items())


# -- attention: a block mask given as pattern= ------------------------------------------------

def test_a_pattern_mask_that_does_not_fit_a_call_is_named_pattern():
    """Before: the mask given as ``pattern=`` was refused as ``mask``, a parameter the
    caller never passed."""
    pattern = resolve_pattern(torch.ones(1, 1, 3, 3, dtype=torch.bool))
    q = torch.randn(1, 1, 8, 4)
    with pytest.raises(ValueError, match=r"^pattern must be a bool tensor .*4, 4\) for "
                                         r"block_size=2, got torch.bool \(1, 1, 3, 3\)"):
        pattern.block_mask(q, q, block_size=2)
    mask = sparsekit.attention.UserMask(torch.ones(1, 1, 3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"^mask must be a bool tensor"):
        mask.block_mask(q, q, block_size=2)  # given as mask=, named mask


def test_apply_with_a_mask_of_other_tiles_names_pattern_in_forward():
    model = _llama()
    sparsekit.attention.apply(model, pattern=torch.ones(1, 1, 3, 3, dtype=torch.bool),
                              block_size=4, min_length=0)
    with pytest.raises(ValueError, match=r"^pattern must be a bool tensor .*4, 4\) for "
                                         r"block_size=4"):
        model(torch.zeros(1, 16, dtype=torch.long))


# -- coverage: the tile table of huge lengths --------------------------------------------------

def test_visible_pairs_of_huge_lengths_in_tiny_tiles_is_a_named_size_error():
    """Before: a raw RuntimeError of the allocator (8 TB asked for)."""
    n = 2 ** 30
    with pytest.raises(ValueError, match=r"q_len=1073741824, kv_len=1073741824 in tiles "
                                         r"of block_size=1 make .* bytes, more than this "
                                         r"machine's memory .*accepted: a larger block_size"):
        visible_pairs(n, n, block_size=1, causal=True)
    assert visible_pairs(n, n, block_size=n, causal=False).tolist() == [[n * n]]


@pytest.mark.parametrize("causal", [False, True])
def test_lengths_whose_pairs_overflow_int64_are_refused_not_counted_as_zero(causal):
    """Before: 2**32 queries by 2**32 keys in one tile counted 0 pairs (int64 wrapped), and
    density() divided by that: NaN, without a sign of it."""
    n = 2 ** 32
    with pytest.raises(ValueError, match=r"q_len \* kv_len must fit int64 .*got "
                                         r"q_len=4294967296, kv_len=4294967296"):
        visible_pairs(n, n, block_size=n, causal=causal)
    with pytest.raises(ValueError, match=r"q_len \* kv_len must fit int64"):
        sparsekit.attention.density(torch.ones(1, 1, 1, 1, dtype=torch.bool), n, n,
                                    block_size=n, causal=causal)


def test_a_pattern_on_the_meta_device_with_huge_lengths_is_a_named_size_error():
    q = torch.empty(1, 1, 2 ** 28, 4, device="meta")
    with pytest.raises(ValueError, match="more than this machine's memory"):
        resolve_pattern("dense").block_mask(q, q, block_size=1)


# -- graph features: max_edges bounds the eigenvalues too ---------------------------------------

def test_structure_features_skips_the_spectral_radius_over_max_edges(monkeypatch):
    """Before: ``eigvals`` of every recurrent layer ran whatever ``max_edges`` said."""
    model = nn.Sequential()
    model.rnn = nn.RNN(3, 4)
    model.fc = nn.Linear(4, 2)
    g = to_graph(model)
    assert structure_features(g)["spectral_radius"] > 0

    def refuse(*args, **kwargs):
        raise AssertionError("eigvals ran over max_edges")

    monkeypatch.setattr(torch.linalg, "eigvals", refuse)
    features = structure_features(g, max_edges=0)
    assert features["spectral_radius"] != features["spectral_radius"]  # NaN
    plain = structure_features(nn.Sequential(nn.Linear(3, 2)), max_edges=0)
    assert plain["spectral_radius"] == 0.0  # no recurrent layer: nothing to compute


# -- structured: masks of the wrong type, removal checked before the biases change -----------

def _chain() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))


@pytest.mark.parametrize("mask, error, match", [
    (torch.ones(3, 6), ArgumentTypeError,
     r"masks\['2.weight'\] must be a bool tensor \(True keeps\), got dtype torch.float32"),
    (torch.ones(3, 6, dtype=torch.uint8), ArgumentTypeError, "got dtype torch.uint8"),
    ([[True] * 6] * 3, ArgumentTypeError,
     r"masks\['2.weight'\] must be a bool tensor of shape \(3, 6\), got list"),
    (torch.ones(3, 5, dtype=torch.bool), ValueError,
     r"masks\['2.weight'\] has shape \(3, 5\), expected \(3, 6\)"),
    (torch.ones(3, 6, dtype=torch.bool).to_sparse(), ArgumentTypeError,
     r"masks\['2.weight'\] must be a dense \(strided\) bool tensor, got layout "
     r"torch.sparse_coo"),
], ids=["float", "uint8", "list", "shape", "sparse"])
def test_shrink_classifies_a_mask_of_the_wrong_type_as_a_type_error(mask, error, match):
    """Before: a float or integer mask was a plain ValueError, unlike every other mask
    check of the library (masks.check_mask: a TypeError that ``except ValueError`` also
    catches)."""
    model = _chain()
    before = _state(model)
    with pytest.raises(error, match=match):
        shrink(model, {"2.weight": mask})
    assert _same(model, before)


def test_check_removal_refuses_what_remove_channels_refuses_and_changes_nothing():
    model = _chain()
    group = dependency_groups(model)[0]
    before = _state(model)
    everything = [(group, torch.arange(6))]
    for call in (check_removal, remove_channels):
        with pytest.raises(ValueError, match=r"removed\[0\] removes every channel of group "
                                             r"'0' \(6\); accepted: at most 5"):
            call(model, everything)
        assert _same(model, before)
    assert check_removal(model, [(group, torch.tensor([1, 2]))])[0][1].tolist() == [1, 2]


def test_a_refused_flap_removal_leaves_the_biases_unchanged(monkeypatch):
    """Before: fold_means added the compensation to the readers' biases (creating them)
    before remove_channels checked the removal, so a refused one left a changed model."""
    from sparsekit.llm import prune_structured
    from sparsekit.llm import structured as llm_structured

    model = _llama()
    before = _state(model)
    select = llm_structured._select

    def every_channel(model, groups, *args, **kwargs):
        removed = select(model, groups, *args, **kwargs)
        return {u: [(g, torch.arange(g.channels)) for g, _ in pairs]
                for u, pairs in removed.items()}

    monkeypatch.setattr(llm_structured, "_select", every_channel)
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match="removes every channel of group"):
        prune_structured(model, ids, 0.5, unit="ffn", method="flap")
    assert _same(model, before)
    assert model.model.layers[0].mlp.down_proj.bias is None


# -- save_pretrained: the files it writes --------------------------------------------------------

def _listing(directory: Path) -> list[tuple[str, bool]]:
    return sorted((n, os.path.islink(directory / n)) for n in os.listdir(directory))


@pytest.mark.parametrize("name", ["config.json", "generation_config.json",
                                  "sparsekit.safetensors"])
@pytest.mark.parametrize("kind", ["loop", "link to a directory", "directory"])
def test_save_pretrained_refuses_a_file_name_it_cannot_write_before_writing(
        tmp_path, name, kind):
    """Before: a raw OSError / IsADirectoryError of atomic_write or transformers, naming no
    argument, after the generation config had been written (a real directory named as the
    weights: after the old config was removed, leaving no loadable directory)."""
    model = _llama()
    model.generation_config = transformers.GenerationConfig()
    (tmp_path / "sub").mkdir()
    if kind == "loop":
        os.symlink(name, tmp_path / name)
    elif kind == "directory":
        (tmp_path / name).mkdir()
    else:
        os.symlink("sub", tmp_path / name)
    listing = _listing(tmp_path)
    what = {"loop": "a symbolic link that leads back to itself",
            "directory": "an existing directory,",
            "link to a directory": "a symbolic link to the directory"}[kind]
    with pytest.raises(ValueError, match=rf"directory '.*': its '{name}' is {what}.*accepted: "
                                         r".*\(nothing was written\)"):
        sparsekit.save_pretrained(model, tmp_path)
    assert _listing(tmp_path) == listing
    assert not os.listdir(tmp_path / "sub")


def test_save_pretrained_through_a_config_link_keeps_the_directory_loadable(tmp_path):
    """Before: the link was removed and the new config written to the file it led to: a
    directory without config.json, which from_pretrained refused."""
    model = _llama()
    (tmp_path / "elsewhere.json").write_text("{}")
    (tmp_path / "m").mkdir()
    os.symlink(tmp_path / "elsewhere.json", tmp_path / "m" / "config.json")
    sparsekit.save_pretrained(model, tmp_path / "m")
    assert os.path.islink(tmp_path / "m" / "config.json")
    back = sparsekit.from_pretrained(tmp_path / "m")
    ids = torch.zeros(1, 4, dtype=torch.long)
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model(ids).logits)


def test_checkpoint_read_of_a_link_loop_is_a_named_value_error(tmp_path):
    os.symlink("loop", tmp_path / "loop")
    for read in (sparsekit.checkpoint.read, sparsekit.checkpoint.read_header):
        with pytest.raises(ValueError, match=r"checkpoint '.*loop' cannot be looked up: .*"
                                             r"accepted: the path of an existing checkpoint"):
            read(tmp_path / "loop")


def test_memory_bound_is_known_here():
    assert memory_bytes() is not None  # the size refusals above rely on it


# -- break-even: GPU work is waited for before each clock reading -----------------------------

def test_break_even_waits_for_queued_gpu_work_before_each_reading(monkeypatch):
    """Before: on CUDA the clock was read while the kernels of a path were still queued, so
    a path's time was its launch (or, after a synchronising op, the other path's work)."""
    events: list[str] = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append(
        f"sync{device}"))
    times = iter([0.0, 1.0, 1.5])

    def clock() -> float:
        events.append("clock")
        return next(times)

    even = sparsekit.attention.BreakEven(clock=clock)
    assert even.run("call", lambda: "dense", lambda: "sparse") == "sparse"
    assert events == ["sync0", "sync1", "clock"] * 3


# -- report: a sparse mask ---------------------------------------------------------------------

def test_report_refuses_a_sparse_mask_by_name():
    """Before: a raw NotImplementedError of count_nonzero on the SparseCPU backend."""
    from types import SimpleNamespace

    from sparsekit.report import report

    model = _chain()
    sparse = torch.ones(6, 4, dtype=torch.bool).to_sparse()
    with pytest.raises(ArgumentTypeError, match=r"masks\['0.weight'\] must be a dense "
                                                r"\(strided\) tensor, got layout "
                                                r"torch.sparse_coo; convert with"):
        report(model, masks=SimpleNamespace(masks={"0.weight": sparse}))
    kept = sparse.to_dense()
    kept[0] = False
    assert report(model, masks=SimpleNamespace(masks={"0.weight": kept})).totals["nonzeros"] \
        == sum(p.numel() for n, p in model.named_parameters() if n.endswith("weight")) - 4


# -- structured importance: a fractional power of negative scores -----------------------------

@pytest.mark.parametrize("which", ["group_importance", "standardized_importance"])
def test_a_fractional_power_of_negative_scores_is_refused_not_nan(which):
    """Before: every importance of the group came back NaN (a root of a negative mean),
    without a sign; a channel ranking of NaN is arbitrary."""
    from sparsekit.structured.adaptive import standardized_importance
    from sparsekit.structured.importance import group_importance

    fn = {"group_importance": group_importance,
          "standardized_importance": standardized_importance}[which]
    model = _chain()
    group = dependency_groups(model)[0]
    scores = {"0.weight": -torch.rand(6, 4), "2.weight": torch.rand(3, 6)}
    with pytest.raises(ValueError, match=r"scores\['0.weight'\] has negative mean scores "
                                         r"\(down to -.*\), which power=0.5 turns into NaN"):
        fn(group, scores, power=0.5)
    for power in (1, 2, 3.0):  # an integer power of a negative score is a number
        assert torch.isfinite(fn(group, scores, power=power)).all()
    assert torch.isfinite(fn(group, {k: v.abs() for k, v in scores.items()}, power=0.5)).all()


# -- llm.load_pretrained: a *.safetensors that is no file ------------------------------------

@pytest.mark.parametrize("kind", ["directory", "link to a directory", "loop", "dangling link"])
def test_load_pretrained_names_a_weights_name_that_is_no_file(tmp_path, kind):
    """Before: safetensors' raw OSError ("No such device (os error 19)") or
    FileNotFoundError, naming no argument."""
    from sparsekit.llm import load_pretrained, prune_structured

    model = _llama(layers=2)
    prune_structured(model, None, 0.5, unit="ffn", method="magnitude", allocation="global")
    model.save_pretrained(tmp_path)
    extra = tmp_path / "extra.safetensors"
    if kind == "directory":
        extra.mkdir()
    elif kind == "link to a directory":
        os.symlink(tmp_path, extra)
    elif kind == "loop":
        os.symlink(extra.name, extra)
    else:
        os.symlink(tmp_path / "nothing", extra)
    with pytest.raises(ValueError, match=r"path: '.*extra.safetensors' is not a weights file"):
        load_pretrained(tmp_path)
    if kind == "directory":
        extra.rmdir()
    else:
        extra.unlink()
    ids = torch.zeros(1, 4, dtype=torch.long)
    with torch.no_grad():
        assert torch.equal(load_pretrained(tmp_path)(ids).logits, model(ids).logits)


def test_tile_mass_of_long_sequences_in_tiny_tiles_is_a_named_size_error():
    """Before: the float64 (batch, heads, q_blocks, kv_blocks) mass was allocated first: a
    raw RuntimeError of the allocator (here 4 TB for 8 MB of queries)."""
    q = torch.randn(1, 8, 2 ** 18, 1)
    with pytest.raises(ValueError, match=r"q_len=262144, kv_len=262144 in tiles of "
                                         r"block_size=1 over 1 x 8 batch entries and heads "
                                         r"make a float64 tile mass of 4,398,046,511,104 "
                                         r"bytes, more than this machine's memory"):
        sparsekit.attention.tile_mass(q, q, block_size=1)


def test_a_block_mask_of_the_wrong_type_is_an_argument_type_error():
    """A float, sparse or non-tensor block mask is a wrong type (an ArgumentTypeError, which
    ``except ValueError`` still catches); a wrong shape stays a plain ValueError."""
    from sparsekit.attention import block_sparse_attention
    q = torch.randn(1, 1, 8, 4)
    good = torch.ones(1, 1, 2, 2, dtype=torch.bool)
    for bad in (good.float(), good.to_sparse(), [[True]]):
        with pytest.raises(ArgumentTypeError, match=r"^block_mask must be a bool tensor"):
            block_sparse_attention(q, q, q, bad, block_size=4)
    with pytest.raises(ValueError, match=r"^block_mask must be a bool tensor") as info:
        block_sparse_attention(q, q, q, good[:, :, :1], block_size=4)
    assert not isinstance(info.value, TypeError)


def test_structure_features_of_a_meta_model_names_its_own_parameter():
    """Before: the error named ``model_or_masks``, ``to_graph``'s parameter."""
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    with pytest.raises(ValueError, match=r"^model_or_graph: weight '0.weight' is on the meta "):
        structure_features(model)
    with pytest.raises(ValueError, match=r"^model_or_masks: weight '0.weight' is on the meta "):
        to_graph(model)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX FIFOs")
def test_save_pretrained_refuses_a_fifo_where_it_writes_a_file(tmp_path):
    """Before: a FIFO named as a file save_pretrained writes passed its up-front check (only
    directories and loops were refused there) and the rename replaced it with a regular file;
    now every file name is checked as a checkpoint path is (``_atomic.unwritable``)."""
    model = _llama()
    os.mkfifo(tmp_path / "config.json")
    listing = _listing(tmp_path)
    with pytest.raises(ValueError, match=r"its 'config.json' is an existing FIFO, not a regular "
                                         r"file.*\(nothing was written\)"):
        sparsekit.save_pretrained(model, tmp_path)
    assert _listing(tmp_path) == listing


@pytest.mark.parametrize("name", ["top_k", "vertical_slash", "antidiagonal"])
def test_scored_patterns_refuse_per_head_score_tables_larger_than_memory(name):
    """Before: the tile table was checked against memory, but not the float32 table of every
    head's tiles that a scored pattern's estimate fills: 4096 heads of 4096 x 4096 tiles
    asked the allocator for 275 GB (a raw RuntimeError, or pages filled until the kill)."""
    q = torch.ones(1, 1, 1, 1).expand(1, 4096, 32768, 1)
    with pytest.raises(ValueError, match=rf"^pattern {name!r}: 4096 x 4096 tiles of block_size=8 "
                                         r"for 1 x 4096 batch entries and heads make float32 "
                                         r"score tables of 274,877,906,944 bytes, more than this "
                                         r"machine's memory .*accepted: a larger block_size"):
        resolve_pattern(name).block_mask(q, q, block_size=8)


@pytest.mark.parametrize("existing", [True, False])
def test_save_pretrained_writes_through_a_link_named_as_the_weights(tmp_path, existing):
    """Before: the final rename replaced a weights link with a regular file, leaving the
    file it led to stale; now the file the link leads to is replaced (created with its
    folders for a link to nothing), the link kept, as for every other file written."""
    model = _llama()
    store = tmp_path / "store" / "weights.safetensors"
    if existing:
        store.parent.mkdir()
        store.write_bytes(b"old")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / WEIGHTS_NAME).symlink_to(store)
    sparsekit.save_pretrained(model, tmp_path / "m")
    assert (tmp_path / "m" / WEIGHTS_NAME).is_symlink() and store.read_bytes() != b"old"
    assert sorted(os.listdir(store.parent)) == ["weights.safetensors"]  # no temporary left
    back = sparsekit.from_pretrained(tmp_path / "m")
    ids = torch.zeros(1, 4, dtype=torch.long)
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model(ids).logits)
