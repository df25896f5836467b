"""Hostile persistence: writers racing for one directory, reloads that must restore
everything a module computes with, and state files written whole or not at all.

- two processes saving ``save_pretrained`` / an SAE to one directory at once leave one
  complete save (``sparsekit._atomic.directory_lock``), never one's config with the
  other's weights;
- a reloaded MoE (``RoutedFFN``) routes as the saved one: its reader norms follow the
  loaded weights and its ``k`` is saved;
- ``SparsityCallback.on_save`` replaces its state file atomically.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
import types

import pytest
import torch

import sparsekit
from sparsekit import moe
from sparsekit._atomic import LOCK_NAME, directory_lock
from sparsekit.moe.routed import RoutedFFN
from sparsekit.sae import SAE
from sparsekit.sae import files as sae_files

transformers = pytest.importorskip("transformers")

POSIX_LOCKS = pytest.mark.skipif(
    os.name != "posix" or "fork" not in multiprocessing.get_all_start_methods(),
    reason="directory_lock serialises writers with fcntl.flock (POSIX only)")
ROUNDS = 10
WAIT_S = 120  # a barrier that long means a writer died


# -- the lock ---------------------------------------------------------------------------------


@POSIX_LOCKS
def test_directory_lock_serialises_holders_and_leaves_no_file(tmp_path):
    events: list[str] = []
    first_in = threading.Event()

    def hold(name: str, pause: float) -> None:
        with directory_lock(tmp_path):
            events.append(f"{name} in")
            first_in.set()
            time.sleep(pause)
            events.append(f"{name} out")

    a = threading.Thread(target=hold, args=("a", 0.3))
    a.start()
    first_in.wait(10)
    b = threading.Thread(target=hold, args=("b", 0.0))
    b.start()
    a.join(10)
    b.join(10)
    assert events == ["a in", "a out", "b in", "b out"]
    assert not (tmp_path / LOCK_NAME).exists()


@POSIX_LOCKS
def test_directory_lock_left_by_a_killed_writer_does_not_block(tmp_path):
    (tmp_path / LOCK_NAME).write_text("")  # a killed holder's: its lock died with it
    with directory_lock(tmp_path) as held:
        assert held == tmp_path
    assert list(tmp_path.iterdir()) == []


# -- two writers of one directory ------------------------------------------------------------


def _tiny_llama(i: int):
    torch.manual_seed(i)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=4, rms_norm_eps=[1e-5, 1e-6][i])
    return transformers.LlamaForCausalLM(config).eval()


def _sae(i: int) -> SAE:
    sae = SAE(8, 16, activation="topk", k=[2, 3][i])
    with torch.no_grad():  # SAE's initialisation does not depend on the seed
        sae.W_enc.copy_(torch.randn(sae.W_enc.shape, generator=torch.Generator().manual_seed(i)))
    return sae


def _writer(kind: str, i: int, target: str, barrier, rounds: int, errors) -> None:
    torch.set_num_threads(1)
    obj = _tiny_llama(i) if kind == "pretrained" else _sae(i)
    for r in range(rounds):
        barrier.wait(WAIT_S)
        try:
            if kind == "pretrained":
                sparsekit.save_pretrained(obj, target)
            else:
                sae_files.save(obj, target)
        except Exception as err:  # reported to the test
            errors.put(f"writer {i} round {r}: {type(err).__name__}: {err}")
        barrier.wait(WAIT_S)  # the test looks at the directory now
        barrier.wait(WAIT_S)


def _whose(kind: str, target: str, refs: list) -> str:
    """Which writer's save ``target`` holds, wholly: ``"0"``/``"1"``, else what is wrong."""
    if kind == "pretrained":
        model = sparsekit.from_pretrained(target)
        got = model.state_dict()
        for i, ref in enumerate(refs):
            weights = all(torch.equal(got[k], v) for k, v in ref.state_dict().items())
            config = model.config.rms_norm_eps == ref.config.rms_norm_eps
            if weights or config:
                return str(i) if weights and config else f"mixed (weights of {i}: {weights})"
        return "neither"
    sae = sae_files.load(target)
    for i, ref in enumerate(refs):
        weights, config = torch.equal(sae.W_enc, ref.W_enc), sae.k == ref.k
        if weights or config:
            return str(i) if weights and config else f"mixed (weights of {i}: {weights})"
    return "neither"


def _race(kind: str, target: str, rounds: int = ROUNDS) -> list[str]:
    """Two forked writers save to ``target`` at once, ``rounds`` times; whose save the
    directory holds after each round."""
    ctx = multiprocessing.get_context("fork")
    barrier, errors = ctx.Barrier(3), ctx.Queue()
    writers = [ctx.Process(target=_writer, args=(kind, i, target, barrier, rounds, errors))
               for i in range(2)]
    for w in writers:
        w.start()
    refs = [_tiny_llama(i) if kind == "pretrained" else _sae(i) for i in range(2)]
    verdicts = []
    try:
        for _ in range(rounds):
            barrier.wait(WAIT_S)
            barrier.wait(WAIT_S)
            try:
                verdicts.append(_whose(kind, target, refs))
            except (OSError, ValueError) as err:
                verdicts.append(f"broken: {type(err).__name__}: {err}")
            verdicts.append("files " + ",".join(sorted(os.listdir(target))))
            barrier.wait(WAIT_S)
    finally:
        for w in writers:
            w.join(WAIT_S)
            if w.is_alive():
                w.kill()
    reported = []
    while not errors.empty():
        reported.append(errors.get())
    assert not reported, reported
    assert all(w.exitcode == 0 for w in writers)
    return verdicts


@POSIX_LOCKS
def test_concurrent_save_pretrained_leaves_one_complete_save(tmp_path):
    """Both used one fixed pending-weights name and no lock: one writer renamed the
    other's weights, leaving config and weights of different saves, or no config.json."""
    torch.set_num_threads(1)
    verdicts = _race("pretrained", str(tmp_path / "out"), rounds=10)
    files = "files config.json,generation_config.json,sparsekit.safetensors"
    assert all(v in ("0", "1", files) for v in verdicts), verdicts


@POSIX_LOCKS
def test_concurrent_sae_saves_leave_one_complete_save(tmp_path):
    """Each file was renamed atomically but the set was not: one SAE's weights came with
    the other's cfg.json (a save now holds three files: the config, SAELens's weights and
    sparsekit's training state)."""
    torch.set_num_threads(1)
    verdicts = _race("sae", str(tmp_path / "out"), rounds=30)
    files = "files cfg.json,sae_weights.safetensors,sparsekit_state.safetensors"
    assert all(v in ("0", "1", files) for v in verdicts), verdicts


# -- MoE: a reload routes as the saved model -------------------------------------------------

CALIBRATION = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
TOKENS = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(2))


def _moe_llama(seed: int):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=4)
    return transformers.LlamaForCausalLM(config).eval()


def _moefied(seed: int, keep: float = 0.5):
    return moe.moefy(_moe_llama(seed), CALIBRATION, experts=4, keep=keep, steps=5, seed=seed)


def _outputs(model) -> list[torch.Tensor]:
    """Logits of several rows and of one decode row, by the routers and by the oracle."""
    out = []
    with torch.no_grad():
        for oracle in (False, True):
            moe.set_oracle(model, oracle)
            out += [model(TOKENS).logits, model(TOKENS[:1, :1]).logits]
        moe.set_oracle(model, False)
    return out


def _layers(model) -> list[RoutedFFN]:
    return [m for m in model.modules() if isinstance(m, RoutedFFN)]


@pytest.fixture(scope="module")
def saved_moe(tmp_path_factory):
    """A moefied tiny LLaMA running 3 of 4 experts, and its checkpoint."""
    torch.set_num_threads(1)
    model = moe.set_keep(_moefied(0), 0.75)
    path = tmp_path_factory.mktemp("moe") / "m.safetensors"
    sparsekit.save(model, path)
    return model, path


def test_moe_reload_routes_like_the_saved_model(saved_moe):
    """The reader norms (a non-persistent buffer) described the skeleton's weights after
    a load, so the oracle chose other experts; k was not saved, so a skeleton built with
    another keep ran another number of experts."""
    model, path = saved_moe
    skeleton = _moefied(5, keep=0.5)
    assert [m.k for m in _layers(skeleton)] == [2, 2]
    sparsekit.load(skeleton, path)
    assert [m.k for m in _layers(skeleton)] == [m.k for m in _layers(model)] == [3, 3]
    for mine, theirs in zip(_layers(skeleton), _layers(model), strict=True):
        assert torch.equal(mine.norms, theirs.norms)
    for got, want in zip(_outputs(skeleton), _outputs(model), strict=True):
        assert torch.equal(got, want)


def test_moe_load_state_dict_restores_norms_and_k(saved_moe):
    model, _ = saved_moe
    other = _moefied(5, keep=0.5)
    other.load_state_dict(model.state_dict())
    assert [m.k for m in _layers(other)] == [3, 3]
    for mine, theirs in zip(_layers(other), _layers(model), strict=True):
        assert torch.equal(mine.norms, theirs.norms)
    for got, want in zip(_outputs(other), _outputs(model), strict=True):
        assert torch.equal(got, want)


def test_moe_checkpoint_saved_without_k_still_loads(saved_moe, tmp_path, monkeypatch):
    """A file written before k was saved loads; the layers keep their own k (and their
    norms follow the loaded weights)."""
    model, _ = saved_moe
    old = tmp_path / "old.safetensors"
    with monkeypatch.context() as m:  # save as sparsekit did before: no extra state
        m.delattr(RoutedFFN, "get_extra_state")
        m.delattr(RoutedFFN, "set_extra_state")
        assert not any(k.endswith("_extra_state") for k in model.state_dict())
        sparsekit.save(model, old)
    skeleton = _moefied(5, keep=0.5)
    sparsekit.load(skeleton, old)
    assert [m.k for m in _layers(skeleton)] == [2, 2]
    for mine, theirs in zip(_layers(skeleton), _layers(model), strict=True):
        assert torch.equal(mine.norms, theirs.norms)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    skeleton.load_state_dict(state)  # strict: the missing k is no missing key


def test_moe_saved_k_out_of_range_is_refused(saved_moe):
    model, _ = saved_moe
    state = model.state_dict()
    key = next(k for k in state if k.endswith("_extra_state"))
    other = _moefied(5)
    for bad in (torch.tensor(9), torch.tensor(0), torch.tensor(1.5), torch.tensor([1, 2])):
        with pytest.raises(ValueError, match="k must be|the saved k must be"):
            other.load_state_dict(state | {key: bad})


# -- SparsityCallback.on_save ------------------------------------------------------------------


def test_sparsity_callback_state_file_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    """It was torch.save'd under its final name: a failure midway left half a file."""
    from sparsekit.integrations.hf import STATE_FILE, SparsityCallback

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    masks = sparsekit.prune(model, 0.5)
    callback = SparsityCallback(masks)
    callback.begin(model, torch.optim.SGD(model.parameters(), lr=0.1))
    args = types.SimpleNamespace(output_dir=str(tmp_path))
    state = types.SimpleNamespace(global_step=3, is_world_process_zero=True)
    folder = tmp_path / "checkpoint-3"
    folder.mkdir()
    callback.on_save(args, state, None)
    saved = (folder / STATE_FILE).read_bytes()
    assert torch.equal(torch.load(folder / STATE_FILE)["masks"]["0.weight"],
                       masks.state_dict()["masks"]["0.weight"])

    def failing_save(obj, file, *a, **kw):
        with open(file, "wb") as f:
            f.write(b"PK half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="No space"):
        callback.on_save(args, state, None)
    assert (folder / STATE_FILE).read_bytes() == saved
    assert [p.name for p in folder.iterdir()] == [STATE_FILE]
    callback.end()
