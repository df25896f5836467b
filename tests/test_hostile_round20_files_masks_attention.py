"""Hostile inputs, round 20: atomic files, checkpoints, masks and block-sparse attention.

- ``sparsekit.save`` (and every writer through ``_atomic.atomic_write``: SAE files, HF
  configs, the decision cache, the training callback's state, profile plots) to a path that
  is a symbolic link replaced the link by a regular file, leaving the file it named as it
  was; the link is now written through, as ``open(path, "w")`` does (a link to nothing
  creates its file, a link to a directory or a loop is refused), and a file replaced keeps
  its permissions (a private 0600 checkpoint became world-readable when saved again);
- ``MaskSet.load_state_dict`` swapped the masks, the weights they follow and the pattern
  before zeroing them: a weight (or an attached optimizer's state) that cannot be changed
  in place (an inference tensor) failed half way, the MaskSet half loaded; ``attach`` of an
  optimizer whose state was loaded under ``torch.inference_mode`` failed with a raw
  ``RuntimeError`` after registering its hooks, and ``update`` half way through;
- ``UserMask`` errors named ``block_mask``, an argument its caller never passed (``mask``,
  a function's result, or ``pattern`` given to ``resolve_pattern`` / ``apply``);
- a sparse (COO) block mask, ``q``, ``k`` or ``v`` failed deep in PyTorch with a raw
  ``NotImplementedError`` / ``RuntimeError``;
- attention with a finite ``scale`` under float32's largest value overflowed the scores:
  rows NaN, or (every kept score of a row at -inf) silently zero, on the kernel and on the
  reference alike (session 40: the kernel op itself refuses the scores that overflowed, not a
  bound read from all of ``q`` and ``k``);
- a float8 parameter stored compressed (``save`` of a model without masks) could not be
  read back: ``load``/``read`` failed with a raw ``NotImplementedError`` (and ``load`` would
  then have built a ``MaskSet`` that refuses float8);
- ``save`` of a removed ``MaskSet`` recorded its pattern for masks it no longer held, and a
  ``load`` of such a file checked that pattern against the unmasked weights only after it
  had loaded them.
"""

from __future__ import annotations

import errno
import os
import stat

import pytest
import torch
from _state import snapshot, unchanged
from torch import nn

import sparsekit
from sparsekit import checkpoint
from sparsekit._atomic import atomic_write, write_target
from sparsekit._checks import ArgumentTypeError
from sparsekit.attention import (
    Dense,
    UserMask,
    block_sparse_attention,
    dense_block_mask,
    density,
    mass_recall,
    resolve_pattern,
)
from sparsekit.attention.block_sparse import reference_attention
from sparsekit.engine import kernels
from sparsekit.masks import MaskSet


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def qkv(q_len: int = 32, kv_len: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return (torch.randn(1, 2, q_len, 8, generator=g), torch.randn(1, 2, kv_len, 8, generator=g),
            torch.randn(1, 2, kv_len, 8, generator=g))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# -- files: symbolic links are written through -----------------------------------------------


def test_atomic_write_through_a_link_to_a_file_keeps_the_link(tmp_path):
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "out.bin"
    target.write_bytes(b"old")
    link = tmp_path / "link.bin"
    link.symlink_to(target)
    with atomic_write(link) as tmp:
        assert tmp.parent == target.parent  # beside the file replaced: one file system
        tmp.write_bytes(b"new")
    # the link was replaced by a regular file, the file it named left as it was
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.read_bytes() == b"new"
    assert sorted(os.listdir(tmp_path)) == ["link.bin", "real"]
    assert os.listdir(tmp_path / "real") == ["out.bin"]


def test_atomic_write_through_a_chain_of_relative_links(tmp_path):
    (tmp_path / "data.bin").write_bytes(b"old")
    (tmp_path / "b").symlink_to("data.bin")
    (tmp_path / "a").symlink_to("b")
    assert write_target(tmp_path / "a") == tmp_path / "data.bin"
    with atomic_write(tmp_path / "a") as tmp:
        tmp.write_bytes(b"new")
    assert (tmp_path / "a").is_symlink() and (tmp_path / "b").is_symlink()
    assert (tmp_path / "data.bin").read_bytes() == b"new"


def test_atomic_write_through_a_link_to_nothing_creates_its_file(tmp_path):
    link = tmp_path / "link.bin"
    link.symlink_to(tmp_path / "missing" / "out.bin")
    with atomic_write(link) as tmp:
        tmp.write_bytes(b"new")
    assert link.is_symlink() and (tmp_path / "missing" / "out.bin").read_bytes() == b"new"


def test_atomic_write_refuses_a_link_to_a_directory_a_loop_or_nothing_under_a_file(tmp_path):
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("x")
    (tmp_path / "to_dir").symlink_to(tmp_path / "dir")
    (tmp_path / "loop_a").symlink_to(tmp_path / "loop_b")
    (tmp_path / "loop_b").symlink_to(tmp_path / "loop_a")
    (tmp_path / "under_file").symlink_to(tmp_path / "file" / "out.bin")
    listed = sorted(os.listdir(tmp_path))
    cases = [("to_dir", IsADirectoryError, r"symbolic link to the directory .*dir'"),
             ("loop_a", OSError, r"leads back to itself \(a loop\)"),
             ("under_file", NotADirectoryError, r"under .*file', which is a file")]
    for name, error, match in cases:
        with pytest.raises(error, match=match), atomic_write(tmp_path / name) as tmp:
            tmp.write_bytes(b"new")
    with pytest.raises(OSError) as info:
        write_target(tmp_path / "loop_a")
    assert info.value.errno == errno.ELOOP
    assert sorted(os.listdir(tmp_path)) == listed  # no temporary file, no link replaced
    assert os.listdir(tmp_path / "dir") == [] and (tmp_path / "file").read_text() == "x"


@pytest.mark.skipif(not hasattr(os, "fchmod"), reason="POSIX permissions")
@pytest.mark.parametrize(("mode", "kept"), [(0o600, 0o600), (0o444, 0o444), (0o4755, 0o755)])
def test_a_replaced_file_keeps_its_permissions(tmp_path, mode, kept):
    target = tmp_path / "private.bin"
    target.write_bytes(b"old")
    target.chmod(mode)
    with atomic_write(target) as tmp:
        tmp.write_bytes(b"new")  # the temporary file takes them only once written
    # was 0o666 & ~umask: a private file became readable by everyone when written again
    # (a set-user-id bit is not given to the new bytes)
    assert stat.S_IMODE(target.stat().st_mode) == kept and target.read_bytes() == b"new"
    fresh = tmp_path / "fresh.bin"
    with atomic_write(fresh) as tmp:
        tmp.write_bytes(b"x")
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o666 & ~_umask()


@pytest.mark.skipif(not hasattr(os, "fchmod"), reason="POSIX permissions")
def test_save_through_a_link_writes_the_linked_checkpoint(tmp_path):
    (tmp_path / "store").mkdir()
    target = tmp_path / "store" / "model.safetensors"
    checkpoint.save(mlp(), target)
    target.chmod(0o600)
    link = tmp_path / "model.safetensors"
    link.symlink_to(target)
    model = mlp()
    masks = sparsekit.prune(model, 0.5)
    assert checkpoint.save(model, link, masks) == link
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    other = mlp()
    loaded = checkpoint.load(other, target)
    assert all(torch.equal(loaded.masks[n], masks.masks[n]) for n in masks.masks)
    assert sorted(os.listdir(tmp_path / "store")) == ["model.safetensors"]


def test_save_through_a_link_to_nothing_creates_the_checkpoint(tmp_path):
    link = tmp_path / "model.safetensors"
    link.symlink_to(tmp_path / "new" / "model.safetensors")
    checkpoint.save(mlp(), link)
    assert link.is_symlink() and (tmp_path / "new" / "model.safetensors").is_file()
    checkpoint.load(mlp(), link)


@pytest.mark.parametrize(("kind", "what"), [
    ("to a directory", "a symbolic link to the directory .*dir'"),
    ("loop", r"a symbolic link that leads back to itself \(a loop\)"),
    ("to nothing under a file", r".*file' is a file, not a directory"),
])
def test_save_refuses_a_link_it_cannot_write_through_before_writing(tmp_path, kind, what):
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("x")
    link = tmp_path / "model.safetensors"
    if kind == "to a directory":
        link.symlink_to(tmp_path / "dir")
    elif kind == "loop":
        link.symlink_to(tmp_path / "other")
        (tmp_path / "other").symlink_to(link)
    else:
        link.symlink_to(tmp_path / "file" / "model.safetensors")
    listed = sorted(os.listdir(tmp_path))
    with pytest.raises(ValueError, match=rf"^path must be the path of the checkpoint file to "
                                         rf"write, got .*model.safetensors' \({what}\)$"):
        checkpoint.save(mlp(), link)
    assert sorted(os.listdir(tmp_path)) == listed and link.is_symlink()
    assert os.listdir(tmp_path / "dir") == []


# -- checkpoints ----------------------------------------------------------------------------


class Float8(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        weight = torch.zeros(16, 16)
        weight[0, :3] = torch.tensor([1.0, -2.0, 0.5])
        self.weight = nn.Parameter(weight.to(torch.float8_e4m3fn), requires_grad=False)
        self.linear = nn.Linear(4, 4)


def test_a_compressed_float8_parameter_is_read_back_bit_for_bit(tmp_path):
    source = Float8()
    path = checkpoint.save(source, tmp_path / "f8.safetensors")
    assert checkpoint.read_header(path)[1]["weight"].encoding != "dense"
    # both failed with a raw NotImplementedError ("masked_fill" … 'Float8_e4m3fn')
    read = checkpoint.read(path).state["weight"]
    assert torch.equal(read.view(torch.uint8), source.weight.view(torch.uint8))
    target = Float8()
    with torch.no_grad():
        target.weight.zero_()
    masks = checkpoint.load(target, path)
    assert torch.equal(target.weight.view(torch.uint8), source.weight.view(torch.uint8))
    assert "weight" not in masks.masks  # a MaskSet cannot mask float8 in place


def test_save_refuses_a_removed_maskset_and_leaves_the_file(tmp_path):
    model = mlp()
    masks = sparsekit.prune(model, 0.5, pattern="2:4")
    path = checkpoint.save(model, tmp_path / "m.safetensors")
    saved = path.read_bytes()
    masks.remove()
    with pytest.raises(ValueError, match=r"^masks: this MaskSet was removed \(remove\(\) dropped "
                                         r"its masks.*accepted: a MaskSet that holds its masks, "
                                         r"or masks=None"):
        checkpoint.save(model, path, masks)
    assert path.read_bytes() == saved


def test_load_of_a_pattern_recorded_without_masks_takes_the_weights_as_they_are(
        tmp_path, monkeypatch):
    """A file an earlier sparsekit saved with a removed MaskSet: its pattern names no
    stored mask. Its weights, trained on after the removal, no longer follow it: the load
    failed that check only after it had loaded them."""
    model = mlp()
    masks = sparsekit.prune(model, 0.5, pattern="2:4")
    masks.remove()
    with torch.no_grad():
        model[0].weight[0, :4] = 1.0  # four kept in a group of 4: not 2:4 any more
    monkeypatch.setattr(MaskSet, "removed", property(lambda self: False))
    path = checkpoint.save(model, tmp_path / "m.safetensors", masks)
    monkeypatch.undo()
    assert checkpoint.read_metadata(path)["pattern"] == "2:4"
    other = mlp()
    loaded = checkpoint.load(other, path)
    assert loaded.pattern == "unstructured"
    assert torch.equal(other[0].weight, model[0].weight)


# -- MaskSet: validate everything, then swap ------------------------------------------------


def _maskset() -> tuple[nn.Module, MaskSet]:
    model = mlp()
    g = torch.Generator().manual_seed(1)
    masks = {"0.weight": torch.rand(16, 8, generator=g) > 0.5,
             "2.weight": torch.rand(4, 16, generator=g) > 0.5}
    return model, MaskSet(model, masks)


def _held(ms: MaskSet) -> tuple:
    return ({n: m.clone() for n, m in ms.masks.items()}, dict(ms.params), ms.pattern,
            dict(ms._owners))


def _same(ms: MaskSet, held: tuple) -> bool:
    masks, params, pattern, owners = held
    return (ms.masks.keys() == masks.keys()
            and all(torch.equal(ms.masks[n], masks[n]) for n in masks)
            and all(ms.params[n] is params[n] for n in params) and ms.pattern == pattern
            and ms._owners == owners)


def test_load_state_dict_of_inference_masks_loads_ordinary_copies():
    model, ms = _maskset()
    with torch.inference_mode():
        state = {"pattern": "unstructured",
                 "masks": {"0.weight": torch.ones(16, 8, dtype=torch.bool),
                           "2.weight": torch.zeros(4, 16, dtype=torch.bool)}}
    ms.load_state_dict(state)
    assert not any(m.is_inference() for m in ms.masks.values())
    assert bool((model[2].weight == 0).all())
    ms.update({"0.weight": torch.zeros(16, 8, dtype=torch.bool)})  # the copies change freely
    assert bool((model[0].weight == 0).all())


def test_load_state_dict_refuses_an_inference_weight_before_swapping_anything():
    model, ms = _maskset()
    with torch.inference_mode():
        replaced = nn.Parameter(torch.randn(4, 16))
    model[2].weight = replaced
    held, before = _held(ms), snapshot(model)
    state = {"pattern": "unstructured",
             "masks": {"0.weight": torch.zeros(16, 8, dtype=torch.bool),
                       "2.weight": torch.zeros(4, 16, dtype=torch.bool)}}
    # the masks and the followed weights were swapped, then apply() failed on 2.weight
    with pytest.raises(ValueError, match=r"^parameter '2.weight' is an inference tensor"):
        ms.load_state_dict(state)
    assert _same(ms, held) and unchanged(model, before)


def _inference_state(optimizer: torch.optim.Optimizer) -> None:
    """Replace ``optimizer``'s state by inference-tensor copies (as a load under
    ``torch.inference_mode`` leaves it)."""
    with torch.inference_mode():
        for state in optimizer.state.values():
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    state[key] = value.clone()


def _stepped(model: nn.Module) -> torch.optim.Optimizer:
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 8)).sum().backward()
    optimizer.step()
    return optimizer


def test_attach_refuses_an_inference_optimizer_state_before_hooking():
    model, ms = _maskset()
    optimizer = _stepped(model)
    _inference_state(optimizer)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"^optimizer state 'exp_avg' of parameter '0.weight' "
                                         r"is an inference tensor"):
        ms.attach(optimizer)
    # was a raw RuntimeError with both hooks registered and the MaskSet counting it attached
    assert not ms._hooks and not optimizer._optimizer_step_pre_hooks
    assert not optimizer._optimizer_step_post_hooks and unchanged(model, before)


@pytest.mark.parametrize("call", ["update", "load_state_dict"])
def test_update_and_load_refuse_an_inference_state_of_an_attached_optimizer(call):
    model, ms = _maskset()
    optimizer = _stepped(model)
    ms.attach(optimizer)
    _inference_state(optimizer)
    held, before = _held(ms), snapshot(model)
    masks = {"0.weight": torch.zeros(16, 8, dtype=torch.bool),
             "2.weight": torch.zeros(4, 16, dtype=torch.bool)}
    with pytest.raises(ValueError, match=r"^optimizer state 'exp_avg' of parameter '0.weight' "
                                         r"is an inference tensor"):
        if call == "update":
            ms.update(masks)
        else:
            ms.load_state_dict({"pattern": "unstructured", "masks": masks})
    assert _same(ms, held) and unchanged(model, before)


# -- attention: messages name what was passed -----------------------------------------------


def test_user_mask_errors_name_the_mask_or_the_call_that_made_it():
    q, k, _ = qkv()
    with pytest.raises(ValueError, match=r"^mask must be a bool tensor \(1 or 1, 1 or 2, 2, 2\) "
                                         r"for block_size=16, got torch.bool \(1, 1, 3, 3\)$"):
        UserMask(torch.ones(1, 1, 3, 3, dtype=torch.bool)).block_mask(q, k, block_size=16)
    function = UserMask(lambda q_len, kv_len, size: torch.ones(1, 1, 3, 3))
    with pytest.raises(ValueError, match=r"^mask\(32, 32, 16\) must be a bool tensor \(1 or 1, "
                                         r"1 or 2, 2, 2\) for block_size=16, got torch.float32"):
        function.block_mask(q, k, block_size=16)
    meta = UserMask(lambda q_len, kv_len, size: torch.ones(1, 1, 2, 2, dtype=torch.bool,
                                                           device="meta"))
    with pytest.raises(ValueError, match=r"^mask\(32, 32, 16\) is on the meta device"):
        meta.block_mask(q, k, block_size=16)


@pytest.mark.parametrize("pattern", [torch.ones(1, 1, 2, 2), torch.ones(2, 2, dtype=torch.bool)])
def test_resolve_pattern_of_a_tensor_names_pattern(pattern):
    with pytest.raises(ValueError, match=r"^pattern must be a bool tensor \(batch or 1, heads or "
                                         r"1, q_blocks, kv_blocks\), got "):
        resolve_pattern(pattern)
    with pytest.raises(ValueError, match=r"^mask must be a bool tensor"):
        UserMask(pattern)


def test_sparse_block_masks_and_inputs_are_refused_by_name():
    q, k, v = qkv()
    sparse = torch.ones(1, 1, 2, 2, dtype=torch.bool).to_sparse()
    layout = r"got torch.bool \(1, 1, 2, 2\) of layout torch.sparse_coo; accepted: a dense"
    # each was a raw NotImplementedError ("… 'SparseCPU' backend") or RuntimeError
    with pytest.raises(ValueError, match=rf"^block_mask must be a bool tensor .*{layout}"):
        block_sparse_attention(q, k, v, sparse, block_size=16)
    with pytest.raises(ValueError, match=rf"^block_mask must be a bool tensor .*{layout}"):
        dense_block_mask(sparse, 32, 32, causal=True, block_size=16)
    with pytest.raises(ValueError, match=rf"^block_mask must be a bool tensor .*{layout}"):
        density(sparse, 32, 32, block_size=16, causal=True)
    with pytest.raises(ValueError, match=rf"^block_mask must be a bool tensor .*{layout}"):
        mass_recall(q, k, sparse, block_size=16)
    with pytest.raises(ValueError, match=rf"^mask must be a bool tensor .*{layout}"):
        UserMask(sparse)
    with pytest.raises(ValueError, match=rf"^pattern must be a bool tensor .*{layout}"):
        resolve_pattern(sparse)
    dense = torch.ones(1, 1, 2, 2, dtype=torch.bool)
    for name, args in (("q", (q.to_sparse(), k, v)), ("k", (q, k.to_sparse(), v)),
                       ("v", (q, k, v.to_sparse()))):
        with pytest.raises(ValueError, match=rf"^{name} must be a dense \(strided\) tensor, got "
                                             r"layout torch.sparse_coo"):
            block_sparse_attention(*args, dense, block_size=16)
    with pytest.raises(ValueError, match=r"^k must be a dense \(strided\) tensor"):
        Dense().block_mask(q, k.to_sparse(), block_size=16)


# -- attention: scores that overflow float32 ------------------------------------------------


ATTENTION = [block_sparse_attention, reference_attention]


@pytest.mark.parametrize("fn", ATTENTION, ids=["kernel", "reference"])
def test_a_scale_that_overflows_the_scores_is_refused(fn):
    q, k, v = qkv()
    mask = torch.ones(1, 1, 2, 2, dtype=torch.bool)
    # finite inputs and a finite scale: every output row was NaN
    with pytest.raises(ValueError, match=r"^scale=1e\+38 overflows the (kernel's )?float32 "
                                         r"scores q · kᵀ · scale( · log2\(e\) \(it "
                                         r"exponentiates in base 2\))? of query \d+ of head "
                                         r"\d+ \(batch 0\) against "
                                         r"key \d+, which turns rows NaN or zero; accepted: "
                                         r"scale ≤ \S+ for that pair \(or rescale q and k\)$"):
        fn(q, k, v, mask, block_size=16, scale=1e38)
    out = fn(q, k, v, mask, block_size=16, scale=1e30)  # large, but the scores fit
    assert bool(out.isfinite().all())


@pytest.mark.parametrize("fn", ATTENTION, ids=["kernel", "reference"])
def test_scores_that_all_overflow_to_minus_inf_are_refused_not_zero(fn):
    q = torch.ones(1, 1, 16, 4)
    v = torch.randn(1, 1, 16, 4, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(1, 1, 1, 1, dtype=torch.bool)
    # every score -inf: each row was silently zero, as if it saw no key
    with pytest.raises(ValueError, match=r"^scale=1e\+38 overflows"):
        fn(q, -q, v, mask, block_size=16, scale=1e38)
    with pytest.raises(ValueError, match=r"^scale=1e\+20 overflows"):
        fn(q * 1e10, -q * 1e10, v, mask, block_size=16, scale=1e20)


@pytest.mark.parametrize("fn", ATTENTION, ids=["kernel", "reference"])
def test_only_scores_that_really_overflow_are_refused(fn):
    """Refused are the kept, visible scores that overflow — not what a bound says could:
    orthogonal huge rows score 0, and an overflowing tile the mask drops or a key after the
    query (causal) is never computed."""
    big = torch.zeros(1, 1, 16, 4)
    big[..., 0] = 1e20
    ortho = torch.zeros(1, 1, 16, 4)
    ortho[..., 1] = 1e20  # ‖q‖ ‖k‖ = 1e40 > float32's largest, but q · kᵀ = 0
    v = torch.randn(1, 1, 16, 4, generator=torch.Generator().manual_seed(0))
    full = torch.ones(1, 1, 1, 1, dtype=torch.bool)
    assert bool(fn(big, ortho, v, full, block_size=16, scale=1.0).isfinite().all())
    # the second key block overflows against every query; the mask drops it
    q = torch.ones(1, 1, 8, 4)
    k = torch.ones(1, 1, 16, 4)
    k[:, :, 8:] = 1e30
    v = torch.randn(1, 1, 16, 4, generator=torch.Generator().manual_seed(1))
    first = torch.tensor([[[[True, False]]]])
    out = fn(q, k, v, first, block_size=8, scale=1e10, causal=False)
    assert torch.allclose(out, v[:, :, :8].mean(2, keepdim=True).expand_as(out), atol=1e-5)
    with pytest.raises(ValueError, match=r"against key (8|9|1[0-5]),"):
        fn(q, k, v, torch.ones(1, 1, 1, 2, dtype=torch.bool), block_size=8, scale=1e10,
           causal=False)
    # causal: query i sees keys up to i; only the last key overflows, and only the last
    # query sees it
    k = torch.ones(1, 1, 8, 4)
    k[:, :, 7] = 1e30
    square = torch.ones(1, 1, 1, 1, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"of query 7 of head 0 \(batch 0\) against key 7,"):
        fn(q, k, v[:, :, :8], square, block_size=8, scale=1e10)
    out = fn(q[:, :, :7], k[:, :, :7], v[:, :, :7], square, block_size=8, scale=1e10)
    assert bool(out.isfinite().all())


def test_the_kernel_op_refuses_overflow_itself():
    """The op notes overflowing scores as it computes them: the Python call reads nothing
    extra (reading all of q and k once cost 8 ms of a 15 ms 16k-token decode call)."""
    if not kernels.available():
        pytest.skip("no compiled kernels")
    q, k, v = qkv()
    mask = torch.ones(1, 1, 2, 2, dtype=torch.bool)
    kernel = torch.ops.sparsekit.block_sparse_attention
    for dtype, threads in ((torch.float32, 1), (torch.float32, 2), (torch.bfloat16, 2)):
        args = [t.to(dtype) for t in (q, k, v)]
        with pytest.raises(ValueError, match=r"^scale=1e\+38 overflows the kernel's float32"):
            kernel(*args, mask, True, 16, 1e38, threads)
    out = block_sparse_attention(q, k, v, mask, block_size=16, scale=1e30)
    assert torch.allclose(out, reference_attention(q, k, v, mask, block_size=16, scale=1e30),
                          atol=1e-5)


def test_non_finite_inputs_still_give_nan_not_a_refusal():
    q, k, v = qkv()
    mask = torch.ones(1, 1, 2, 2, dtype=torch.bool)
    q[0, 0, 0, 0] = float("nan")
    k[0, 1, 3, 2] = float("inf")  # an infinite score (or a zero weight) from query 3 of head 1
    outs = [fn(q, k, v, mask, block_size=16, scale=1e30) for fn in ATTENTION]
    for out in outs:  # (SDPA, the reference, also spreads the infinity to rows 1-2 of head 1)
        assert bool(out[0, 0, 0].isnan().all()) and bool(out[0, 0, 1:].isfinite().all())
        assert not bool(out[0, 1, 3:].isfinite().all())
    assert bool(outs[0][0, 1, :3].isfinite().all())
    bf16 = [t.bfloat16() for t in qkv()]
    with pytest.raises(ValueError, match=r"^scale=1e\+38 overflows"):
        block_sparse_attention(*bf16, mask, block_size=16, scale=1e38)


def test_dense_block_mask_past_memory_is_a_named_size_error():
    """An element mask of 2**40 bools failed raw in the allocator (session 40); the size is
    checked first. (The native kernel builds none; the reference and the coverage do.)"""
    length = 2 ** 20
    tiles = length // 2 ** 14
    mask = torch.ones(1, 1, tiles, tiles, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"^q_len=1048576, kv_len=1048576 with a block mask "
                                         r"of shape \(1, 1, 64, 64\) make a bool element mask "
                                         r"of [\d,]+ bytes, more than this machine's memory .*"
                                         r"accepted: shorter sequences"):
        dense_block_mask(mask, length, length, causal=True, block_size=2 ** 14)


# -- attention: scored patterns and masses --------------------------------------------------


@pytest.mark.parametrize("name", ["top_k", "vertical_slash", "antidiagonal"])
def test_scored_patterns_refuse_estimates_that_overflow_float32(name):
    q, k, _ = qkv()
    # finite q and k whose products overflow: NaN softmaxes counted as no mass (or infinite
    # scores ranked at random) chose a wrong mask without a sign of it
    with pytest.raises(ValueError, match=rf"^pattern {name!r}: the scores it estimates from q "
                                         r"and k overflow float32"):
        resolve_pattern(name).block_mask(q * 1e20, k * 1e20, block_size=8)
    assert resolve_pattern(name).block_mask(q * 1e3, k * 1e3, block_size=8).any()


def test_mass_recall_refuses_masses_no_softmax_gives():
    q, k, _ = qkv()
    mask = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    mass = torch.zeros(1, 2, 4, 4, dtype=torch.float64)
    mass[..., 0] = 9.0  # a block of 8 query rows holds at most 8
    # the recall was 1.125, a fraction above 1
    with pytest.raises(ValueError, match=r"^mass must hold the softmax masses of q and k "
                                         r"\(tile_mass\): a query block's tiles add up to at "
                                         r"most its rows, got 9 in query block 0 \(batch 0, "
                                         r"head 0\) of 8 rows$"):
        mass_recall(q, k, mask, block_size=8, mass=mass)


def test_a_masked_complex_weight_is_saved_and_loaded(tmp_path):
    class Complex(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(8, 8, dtype=torch.complex64,
                                                   generator=torch.Generator().manual_seed(0)))

    model = Complex()
    keep = torch.rand(8, 8, generator=torch.Generator().manual_seed(1)) > 0.5
    masks = MaskSet(model, {"weight": keep}).apply()
    # was a raw NotImplementedError: "signbit is not implemented for complex tensors"
    path = checkpoint.save(model, tmp_path / "c.safetensors", masks)
    other = Complex()
    loaded = checkpoint.load(other, path)
    assert torch.equal(other.weight, model.weight) and torch.equal(loaded.masks["weight"], keep)
    with torch.no_grad():
        model.weight[~keep] = torch.complex(torch.tensor(0.0), torch.tensor(-0.0))
    with pytest.raises(ValueError, match=r"masks: weights of 'weight' are not \+0.0 where "
                                         rf"masked: 0 nonzero and {int((~keep).sum())} -0.0"):
        checkpoint.save(model, tmp_path / "c.safetensors", masks)


@pytest.mark.parametrize("read", [checkpoint.read, checkpoint.read_metadata,
                                  lambda path: checkpoint.load(mlp(), path)])
def test_reading_a_path_with_a_nul_character_names_it(read):
    # was os.stat's ValueError "embedded null byte", naming no argument and no file
    with pytest.raises(ValueError, match=r"^checkpoint 'a\\x00b' holds a NUL character"):
        read("a\0b")


@pytest.mark.parametrize("read", [checkpoint.read, checkpoint.read_metadata,
                                  lambda path: checkpoint.load(mlp(), path)])
def test_reading_a_link_loop_or_a_path_under_a_file_names_it(read, tmp_path):
    # were raw OSErrors (ELOOP, ENOTDIR) of os.stat
    loop = tmp_path / "loop.safetensors"
    loop.symlink_to(loop)
    with pytest.raises(ValueError, match=r"^checkpoint '.*loop.safetensors' cannot be looked "
                                         r"up: Too many levels of symbolic links; accepted"):
        read(loop)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"^checkpoint '.*file/c.safetensors' cannot be looked "
                                         r"up: Not a directory; accepted"):
        read(tmp_path / "file" / "c.safetensors")


def test_a_mask_under_the_second_name_of_a_shared_layer_names_the_first():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    keep = torch.rand(4, 4, generator=torch.Generator().manual_seed(0)) > 0.5
    # was "not a parameter of the model; parameters: 0.weight, 0.bias", of one it holds
    with pytest.raises(ValueError, match=r"^masks has an entry '2.weight' that names the "
                                         r"parameter '0.weight' by another path .*accepted: one "
                                         r"mask per weight, under '0.weight'$"):
        MaskSet(model, {"2.weight": keep})
    masks = MaskSet(model, {"0.weight": keep})
    with pytest.raises(ValueError, match=r"^masks has an entry '2.weight' that names the "
                                         r"parameter '0.weight'"):
        masks.load_state_dict({"masks": {"2.weight": keep}})
    with pytest.raises(ValueError, match=r"^masks has an entry '2.weight' that names the "
                                         r"parameter '0.weight'"):
        masks.update({"2.weight": keep})


@pytest.mark.parametrize("pattern", [torch.ones(1, 1, 2, 2),
                                     torch.ones(1, 1, 2, 2, dtype=torch.bool).to_sparse()])
def test_a_user_mask_of_the_wrong_dtype_or_layout_is_an_argument_type_error(pattern):
    """Before: a plain ValueError, where every other block-mask check (``_check_mask``) raises
    an ArgumentTypeError for a wrong type; a wrong number of dimensions stays a ValueError."""
    with pytest.raises(ArgumentTypeError, match=r"^pattern must be a bool tensor"):
        resolve_pattern(pattern)
    with pytest.raises(ArgumentTypeError, match=r"^mask must be a bool tensor"):
        UserMask(pattern)
    with pytest.raises(ValueError, match=r"^mask must be a bool tensor") as info:
        UserMask(torch.ones(2, 2, dtype=torch.bool))
    assert not isinstance(info.value, ArgumentTypeError)
