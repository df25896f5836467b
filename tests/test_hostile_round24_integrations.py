"""Hostile round 24: the training integrations (HF Trainer, Lightning, accelerate) and
sparsekit.distributed, each case a defect found and fixed."""

import os
import re
import shutil
import types
import warnings

import pytest
import torch
from torch import nn

import sparsekit
from sparsekit import GradualPruner


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))


# -- HF Trainer ------------------------------------------------------------------------------


def _bert() -> nn.Module:
    """test_integrations_hf's tiny BERT classifier (that module needs transformers)."""
    pytest.importorskip("transformers")
    from test_integrations_hf import _bert as bert
    return bert()


def _Data(*args: int) -> torch.utils.data.Dataset:
    """test_integrations_hf's sequence-classification dataset."""
    from test_integrations_hf import _Data as data
    return data(*args)


def _hf_run(out, target: float, *, resume=None, resume_arg=None, steps: int = 4, **args):
    """A real Trainer run of a GradualPruner to ``target`` over 4 steps, saving every 2."""
    transformers = pytest.importorskip("transformers")
    from sparsekit.integrations.hf import SparsityCallback

    model = _bert()
    gradual = GradualPruner(model, target, start_step=0, end_step=4, every=1)
    training = transformers.TrainingArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=4,
        learning_rate=1e-2, use_cpu=True, report_to=[], save_strategy="steps", save_steps=2,
        logging_strategy="no", disable_tqdm=True, data_seed=0, seed=0,
        resume_from_checkpoint=None if resume_arg is None else str(resume_arg), **args)
    callback = SparsityCallback(gradual)
    trainer = transformers.Trainer(model=model, args=training, train_dataset=_Data(),
                                   callbacks=[callback])
    trainer.train(resume_from_checkpoint=None if resume is None else str(resume))
    return gradual, callback


def test_hf_resume_from_outside_output_dir_loads_that_checkpoints_state(tmp_path):
    """trainer.train(resume_from_checkpoint="/elsewhere/checkpoint-2") with an output_dir
    holding checkpoint-2 of another run: the callback, told only the step, loaded that
    other run's sparsekit_state.pt — its masks (of another target) silently replaced those
    of the checkpoint resumed. Each file now records a digest of the weights saved with it:
    the stale one is refused, naming it, and with args.resume_from_checkpoint set the
    state of the checkpoint resumed is found and the run ends exactly as the one that
    never stopped."""
    from sparsekit.integrations.hf import STATE_FILE

    whole, _ = _hf_run(tmp_path / "a", 0.8)
    elsewhere = tmp_path / "elsewhere" / "checkpoint-2"
    shutil.copytree(tmp_path / "a" / "checkpoint-2", elsewhere)
    shutil.rmtree(tmp_path / "a")
    _hf_run(tmp_path / "b", 0.5, steps=2)  # another run: output_dir/checkpoint-2 is its
    stale = tmp_path / "b" / "checkpoint-2" / STATE_FILE
    stale_bytes = stale.read_bytes()
    with pytest.raises(ValueError, match=rf"^{re.escape(str(stale))} is the state of another "
                                         r"checkpoint than the one resumed at step 2: .*"
                                         r"resume_from_checkpoint="):
        _hf_run(tmp_path / "b", 0.8, resume=elsewhere)
    assert stale.read_bytes() == stale_bytes
    resumed, callback = _hf_run(tmp_path / "b", 0.8, resume=elsewhere, resume_arg=elsewhere)
    assert resumed.step_count == whole.step_count == 4
    for n, m in whole.masks.masks.items():
        assert torch.equal(resumed.masks.masks[n], m)
    assert not resumed.masks._optimizers  # detached at train end


def test_hf_resume_from_its_own_output_dir_still_resumes(tmp_path):
    """The usual resume (the checkpoint under output_dir) finds its state as before, and a
    state saved before the weights were recorded beside it (no sparsekit_weights.json)
    still loads. The state file is the bare state_dict, as before."""
    from sparsekit.integrations.hf import STATE_FILE, WEIGHTS_FILE

    whole, _ = _hf_run(tmp_path, 0.8)
    resumed, _ = _hf_run(tmp_path, 0.8, resume=tmp_path / "checkpoint-2")
    for n, m in whole.masks.masks.items():
        assert torch.equal(resumed.masks.masks[n], m)
    state = torch.load(tmp_path / "checkpoint-2" / STATE_FILE, weights_only=True)
    assert state.keys() == whole.state_dict().keys()
    (tmp_path / "checkpoint-2" / WEIGHTS_FILE).unlink()  # saved before it was written
    legacy, _ = _hf_run(tmp_path, 0.8, resume=tmp_path / "checkpoint-2")
    for n, m in whole.masks.masks.items():
        assert torch.equal(legacy.masks.masks[n], m)


def test_hf_load_best_model_at_end_gives_the_masks_of_the_best_model(tmp_path):
    """With load_best_model_at_end the Trainer put back the weights of the best
    checkpoint (step 2, 70% zeros) after training, and callback.masks stayed those of the
    last step (80%): masks and weights disagreed, the masks zeroing weights the best model
    kept. The best checkpoint's state is now loaded with its weights."""
    transformers = pytest.importorskip("transformers")
    from sparsekit.integrations.hf import SparsityCallback

    model = _bert()
    gradual = GradualPruner(model, 0.8, start_step=0, end_step=4, every=1)
    scores = iter([0, 5, 1, 0])
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4,
        learning_rate=1e-2, use_cpu=True, report_to=[], save_strategy="steps", save_steps=1,
        eval_strategy="steps", eval_steps=1, load_best_model_at_end=True,
        metric_for_best_model="score", logging_strategy="no", disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Data(),
                                   eval_dataset=_Data(8), callbacks=[SparsityCallback(gradual)],
                                   compute_metrics=lambda _: {"score": next(scores)})
    trainer.train()
    assert trainer.state.best_model_checkpoint == str(tmp_path / "checkpoint-2")
    best = transformers.BertForSequenceClassification.from_pretrained(
        str(tmp_path / "checkpoint-2"))
    assert gradual.step_count == 2 and gradual.masks.sparsity() < 0.75
    weights = dict(model.named_parameters())
    for n, p in best.named_parameters():
        assert torch.equal(weights[n], p)
        if n in gradual.masks.masks:
            assert torch.equal(gradual.masks.masks[n], p != 0)


def test_hf_only_the_masked_weights_tell_whose_state_it_is(tmp_path):
    """A resume of the right checkpoint whose other weights differ (a head the Trainer
    does not save, a bias frozen and reset) still finds its state: only the masked weights
    recorded are compared. A file of other masked weights is refused, naming it, with
    nothing attached."""
    pytest.importorskip("transformers")
    from sparsekit.integrations.hf import STATE_FILE, SparsityCallback

    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    gradual = GradualPruner(model, 0.5, start_step=0, end_step=4, every=1)
    callback = SparsityCallback(gradual)
    args = types.SimpleNamespace(output_dir=str(tmp_path))
    state = types.SimpleNamespace(global_step=0, is_world_process_zero=True)
    callback.on_train_begin(args, state, None, model=model, optimizer=optimizer)
    for _ in range(2):
        model(torch.randn(4, 8)).sum().backward()
        optimizer.step()
    state.global_step = 2
    (tmp_path / "checkpoint-2").mkdir()
    callback.on_save(args, state, None)
    callback.on_train_end(args, state, None)
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}

    def resume(model):
        again = GradualPruner(model, 0.5, start_step=0, end_step=4, every=1)
        fresh = SparsityCallback(again)
        fresh.on_train_begin(args, state, None, model=model,
                             optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
        fresh.on_train_end(args, state, None)
        return again

    frozen = _model()
    frozen.load_state_dict(saved)
    with torch.no_grad():
        frozen[0].bias.fill_(3.0)
    frozen[0].bias.requires_grad_(False)
    assert resume(frozen).step_count == 2
    other = _model()
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'checkpoint-2' / STATE_FILE} "
                                                   "is the state of another checkpoint")):
        resume(other)


@pytest.mark.parametrize("content", [b"{not json", b'{"weights": [1]}', b"\xff\xfe", b"[]",
                                     "fifo", "directory"],
                         ids=["broken", "no mapping", "not utf-8", "no weights", "fifo",
                              "directory"])
def test_hf_a_damaged_weights_record_is_a_value_error_naming_it(tmp_path, content):
    """The record beside the state is read before anything is attached: what is no record
    is a ValueError naming it, with nothing attached (a FIFO in its place is not read: it
    would block for ever)."""
    pytest.importorskip("transformers")
    from sparsekit.integrations.hf import STATE_FILE, WEIGHTS_FILE, SparsityCallback

    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    gradual = GradualPruner(model, 0.5, start_step=0, end_step=4, every=1)
    folder = tmp_path / "checkpoint-2"
    folder.mkdir()
    torch.save(gradual.state_dict(), folder / STATE_FILE)
    if content == "fifo":
        os.mkfifo(folder / WEIGHTS_FILE)
    elif content == "directory":
        (folder / WEIGHTS_FILE).mkdir()
    else:
        (folder / WEIGHTS_FILE).write_bytes(content)
    callback = SparsityCallback(gradual)
    with pytest.raises(ValueError, match=re.escape(f"{folder / WEIGHTS_FILE} is no record of "
                                                   "SparsityCallback's weights")):
        callback.on_train_begin(types.SimpleNamespace(output_dir=str(tmp_path)),
                                types.SimpleNamespace(global_step=2), None,
                                model=model, optimizer=optimizer)
    assert callback.attached is None and not optimizer._optimizer_step_post_hooks


# -- Lightning ---------------------------------------------------------------------------------


def _pl_module():
    pl = pytest.importorskip("lightning.pytorch")

    class Classifier(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, _index):
            x, y = batch
            return nn.functional.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-2)

    return Classifier()


def _pl_loader():
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(32, 8, generator=g),
                                          torch.randint(0, 4, (32,), generator=g))
    return torch.utils.data.DataLoader(data, batch_size=32)


def _pl_trainer(steps: int, callbacks):
    pl = pytest.importorskip("lightning.pytorch")
    return pl.Trainer(max_steps=steps, accelerator="cpu", logger=False,
                      enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=callbacks)


def _two_schedules(module):
    return (GradualPruner(module, 0.8, start_step=0, end_step=4, every=1, targets="net.0"),
            GradualPruner(module, 0.5, start_step=0, end_step=4, every=1, targets="net.2"))


def test_lightning_two_callbacks_of_other_weights_each_resume_their_own_state(tmp_path):
    """Two SparsityCallbacks (one schedule per layer) in one Trainer were refused at
    Trainer() with Lightning's RuntimeError ("Found more than one stateful callback of type
    `SparsityCallback`"): both had the class name as state_key. The key now names their
    weights: both train, both are saved, and each resumes its own schedule exactly."""
    from sparsekit.integrations.lightning import SparsityCallback

    def fit(steps, ckpt_path=None, save=None):
        module = _pl_module()
        first, second = _two_schedules(module)
        callbacks = [SparsityCallback(first), SparsityCallback(second)]
        assert callbacks[0].state_key != callbacks[1].state_key
        trainer = _pl_trainer(steps, callbacks)
        trainer.fit(module, _pl_loader(), ckpt_path=ckpt_path)
        if save is not None:
            trainer.save_checkpoint(save)
        return first, second

    whole = fit(4)
    fit(2, save=tmp_path / "half.ckpt")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # each finds its state
        resumed = fit(4, ckpt_path=tmp_path / "half.ckpt")
    for w, r in zip(whole, resumed, strict=True):
        assert r.step_count == w.step_count == 4
        assert w.masks.masks.keys() == r.masks.masks.keys()
        for n, m in w.masks.masks.items():
            assert torch.equal(r.masks.masks[n], m)
    assert resumed[0].masks.sparsity() == pytest.approx(0.8, abs=0.01)
    assert resumed[1].masks.sparsity() == pytest.approx(0.5, abs=0.01)


def test_lightning_state_saved_under_the_class_name_still_resumes(tmp_path):
    """A checkpoint saved before the key named the weights holds the state under
    "SparsityCallback": it is still found (Lightning's legacy key)."""
    from sparsekit.integrations.lightning import SparsityCallback

    module = _pl_module()
    gradual = GradualPruner(module, 0.8, start_step=0, end_step=4, every=1)
    trainer = _pl_trainer(2, [SparsityCallback(gradual)])
    trainer.fit(module, _pl_loader())
    trainer.save_checkpoint(tmp_path / "half.ckpt")
    checkpoint = torch.load(tmp_path / "half.ckpt", weights_only=False)
    (state,) = checkpoint["callbacks"].values()
    checkpoint["callbacks"] = {"SparsityCallback": state}
    torch.save(checkpoint, tmp_path / "old.ckpt")
    module = _pl_module()
    again = GradualPruner(module, 0.8, start_step=0, end_step=4, every=1)
    _pl_trainer(4, [SparsityCallback(again)]).fit(module, _pl_loader(),
                                                  ckpt_path=tmp_path / "old.ckpt")
    assert again.step_count == 4


def test_lightning_two_callbacks_lightning_cannot_tell_apart_are_refused():
    """Two functions (whose weights are known only once they have run) or two sparsities
    of the same weights share a state key: Lightning refuses them at Trainer()."""
    from sparsekit.integrations.lightning import SparsityCallback

    module = _pl_module()
    functions = [SparsityCallback(lambda m, opt: sparsekit.prune(m, 0.5)) for _ in range(2)]
    same = [SparsityCallback(sparsekit.prune(module, s)) for s in (0.5, 0.7)]
    for callbacks in (functions, same):
        with pytest.raises(RuntimeError, match="more than one stateful callback of type "
                                               "`SparsityCallback`"):
            _pl_trainer(1, callbacks)


def test_lightning_validate_from_a_checkpoint_does_not_resume_the_next_fit(tmp_path):
    """validate(ckpt_path=...) loads the callbacks' states too; the state was kept for the
    next fit, so a fresh fit (no checkpoint, step 0) silently started from that
    checkpoint's masks and step (3 after 1 step). A state no training took is dropped when
    its run ends."""
    from sparsekit.integrations.lightning import SparsityCallback

    module = _pl_module()
    trainer = _pl_trainer(2, [SparsityCallback(GradualPruner(
        module, 0.8, start_step=0, end_step=4, every=1))])
    trainer.fit(module, _pl_loader())
    trainer.save_checkpoint(tmp_path / "half.ckpt")
    module = _pl_module()
    module.validation_step = lambda batch, *_: nn.functional.cross_entropy(module(batch[0]),
                                                                           batch[1])
    gradual = GradualPruner(module, 0.8, start_step=0, end_step=4, every=1)
    callback = SparsityCallback(gradual)
    _pl_trainer(1, [callback]).validate(module, _pl_loader(), ckpt_path=tmp_path / "half.ckpt",
                                        verbose=False)
    _pl_trainer(1, [callback]).fit(module, _pl_loader())
    assert gradual.step_count == 1


def test_lightning_a_failed_fit_lets_go_of_its_optimizer():
    """A fit that raised never reached on_train_end: the schedule stayed attached to that
    run's optimizer, and fitting again with a new callback of the same schedule was refused
    ("attached already"). The callback now detaches on the exception."""
    from sparsekit.integrations.lightning import SparsityCallback

    module = _pl_module()
    step = module.training_step

    def failing(batch, *rest):
        if module.trainer.global_step == 2:
            raise RuntimeError("boom")
        return step(batch, *rest)

    module.training_step = failing
    gradual = GradualPruner(module, 0.8, start_step=0, end_step=6, every=1)
    first = SparsityCallback(gradual)
    trainer = _pl_trainer(4, [first])
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(module, _pl_loader())
    (optimizer,) = trainer.optimizers
    assert not optimizer._optimizer_step_pre_hooks and not optimizer._optimizer_step_post_hooks
    module.training_step = step
    _pl_trainer(4, [SparsityCallback(gradual)]).fit(module, _pl_loader())
    assert gradual.step_count == 6


# -- attach and the callbacks' arguments --------------------------------------------------------


@pytest.mark.parametrize("sparsity, expected", [
    (GradualPruner, r"got the class GradualPruner: pass an instance of it, or a function "
                    r"\(model, optimizer\) that builds one"),
    (sparsekit.MaskSet, "got the class MaskSet: pass an instance"),
    (lambda: None, r"the function must take the two arguments \(model, optimizer\), its "
                   r"signature is \(\)"),
    (lambda model: None, r"its signature is \(model\)"),
    (lambda model, optimizer, *, target: None, r"its signature is \(model, optimizer, \*, "
                                               r"target\)"),
    (len, r"its signature is \(obj, /\)"),
], ids=["schedule class", "maskset class", "no argument", "one argument", "keyword", "builtin"])
def test_a_class_or_a_function_of_other_arguments_is_refused_when_the_callback_is_built(
        sparsity, expected):
    """SparsityCallback(GradualPruner) (the class) or a function that cannot take (model,
    optimizer) was accepted as a function, and failed only once training began: Python's
    "missing 3 required keyword-only arguments", or the class's own check naming the
    optimizer ("masks must be a dict of name -> bool tensor, got SGD")."""
    from sparsekit.integrations import training

    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match=expected):
        training.TrainingSparsity(sparsity)
    with pytest.raises(TypeError, match=expected):
        training.attach(sparsity, model, optimizer)
    assert not optimizer._optimizer_step_pre_hooks and not optimizer._optimizer_step_post_hooks
    for fine in (lambda model, optimizer: None, lambda *args: None, sparsekit.prune):
        training.check(fine)  # two positional arguments fit

    class Dynamic(sparsekit.DynamicSparsity):  # a schedule class built from (model, optimizer)
        def __init__(self, model, optimizer):
            super().__init__(model, optimizer, 0.5, method="rigl", every=1, end_step=4,
                             allocation="uniform")

    attached = training.attach(Dynamic, model, optimizer)
    assert isinstance(attached.schedule, Dynamic)
    attached.remove()


def test_removing_an_attach_leaves_masks_attached_before_it_attached():
    """attach(masks, ...) of masks already attached to the optimizer (by masks.attach, or
    by an earlier attach) and then remove() detached them altogether: the masking set up
    before (or by the other Attached, still in use) silently stopped, and the masked
    weights revived at the next step."""
    from sparsekit.integrations import training

    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    masks = sparsekit.prune(model, 0.5)
    for before in ("masks.attach", "attach"):
        first = masks.attach(optimizer) if before == "masks.attach" else training.attach(
            masks, model, optimizer)
        training.attach(masks, model, optimizer).remove()
        model(torch.randn(4, 8)).sum().backward()
        optimizer.step()
        for n, p in masks.params.items():
            assert (p[~masks.masks[n]] == 0).all(), (before, n)
        first.detach(optimizer) if before == "masks.attach" else first.remove()
        assert not optimizer._optimizer_step_pre_hooks and not masks._optimizers


def test_accelerate_attach_gives_a_function_the_model_a_compile_wraps():
    """accelerate.attach of a torch.compile-d model handed the sparsity function the
    compiled wrapper (unwrap_model keeps it by default): its masks were named
    '_orig_mod.0.weight', names the model saved without compiling lacks."""
    accelerate = pytest.importorskip("accelerate")
    from sparsekit.integrations.accelerate import attach

    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    accelerator = accelerate.Accelerator(cpu=True)
    compiled, optimizer = accelerator.prepare(torch.compile(model), optimizer)
    seen = []

    def build(module, _optimizer):
        seen.append(module)
        return sparsekit.prune(module, 0.5)

    attached = attach(accelerator, build, compiled, optimizer)
    assert seen == [model] and sorted(attached.masks.masks) == ["0.weight", "1.weight"]
    attached.remove()


def test_hf_two_callbacks_in_one_trainer_are_refused_naming_why(tmp_path):
    """Two SparsityCallbacks in one Trainer (one schedule per layer) both wrote the same
    sparsekit_state.pt of each checkpoint, the second over the first, and a resume loaded
    that one state into both (a ValueError at best). The second is now refused when
    training begins; after a train() that failed, end() lets the next callback train."""
    transformers = pytest.importorskip("transformers")
    from sparsekit.integrations.hf import SparsityCallback

    model = _bert()
    first, second = (
        SparsityCallback(GradualPruner(model, s, start_step=0, end_step=4, every=1,
                                       targets=f"bert.encoder.layer.{i}.*"))
        for i, s in ((0, 0.8), (1, 0.5)))
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, use_cpu=True,
        report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Data(),
                                   callbacks=[first, second])
    with pytest.raises(ValueError, match="another SparsityCallback \\(of a GradualPruner\\) "
                                         "holds this Trainer's optimizer: both would save"):
        trainer.train()
    assert second.attached is None
    trainer.remove_callback(first)
    first.end()
    trainer.train()
    assert second.schedule.step_count == 2 and first.schedule.step_count == 0


# -- sparsekit.distributed ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["meta", "sparse", "sparse_csr", "quantized", "nested"])
def test_rank_agreement_names_a_tensor_it_cannot_compare(monkeypatch, kind):
    """check_same_on_ranks across ranks fingerprints each tensor: one on the meta device
    failed with "Cannot copy out of meta tensor; no data!", a sparse one with "reshape is
    not implemented for sparse tensors", a quantized one with "Creation of quantized tensor
    requires quantized dtype" — none naming the tensor. Refused by name before any
    collective (a world of 2 is pretended: nothing is sent)."""
    from sparsekit import distributed

    tensor = {"meta": lambda: torch.empty(3, device="meta"),
              "sparse": lambda: torch.eye(3).to_sparse(),
              "sparse_csr": lambda: torch.eye(3).to_sparse_csr(),
              "quantized": lambda: torch.quantize_per_tensor(torch.ones(3), 0.1, 0,
                                                             torch.qint8),
              "nested": lambda: torch.nested.nested_tensor([torch.ones(2), torch.ones(3)],
                                                           layout=torch.jagged)}[kind]()
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    expected = ("masks 'layer.weight' is on the meta device" if kind == "meta" else
                "masks 'layer.weight' must be a dense tensor to compare between ranks, got a "
                f"{kind if kind in ('quantized', 'nested') else 'sparse'} one")
    with pytest.raises(ValueError, match=re.escape(expected)):
        distributed.check_same_on_ranks({"ok": torch.ones(2), "layer.weight": tensor})


def test_a_schedule_a_function_built_goes_on_with_the_next_trainings_optimizer():
    """A callback whose function built a DynamicSparsity on one training's optimizer was
    refused by the next training that has another optimizer (every Lightning fit builds
    one): "this DynamicSparsity was built on another optimizer …; pass a function" — the
    user had passed one. It is now built again on the new optimizer, from the masks, step
    and weights the first training ended with."""
    from sparsekit import DynamicSparsity
    from sparsekit.integrations.lightning import SparsityCallback

    def build(model, optimizer):
        return DynamicSparsity(model, optimizer, 0.7, method="rigl", every=1, end_step=10,
                               allocation="uniform")

    module = _pl_module()
    callback = SparsityCallback(build)
    _pl_trainer(2, [callback]).fit(module, _pl_loader())
    first = callback.schedule
    masks = {n: m.clone() for n, m in first.masks.masks.items()}
    weights = {n: p.detach().clone() for n, p in module.named_parameters()}
    callback.begin(module, torch.optim.AdamW(module.parameters(), lr=1e-2))
    assert callback.schedule is not first and callback.schedule.step_count == 2
    for n, m in masks.items():
        assert torch.equal(callback.masks.masks[n], m)
    for n, p in module.named_parameters():
        assert torch.equal(p, weights[n])
    callback.end()
    _pl_trainer(3, [callback]).fit(module, _pl_loader())
    assert callback.schedule.step_count == 5
    assert callback.masks.sparsity() == pytest.approx(0.7, abs=0.01)


def test_shard_like_names_what_is_no_tensor():
    """shard_like(3, tensor) returned 3 in one process and failed inside distribute_tensor
    with "'int' object has no attribute 'shape'" under FSDP2; both are refused by name."""
    from sparsekit.distributed import shard_like

    with pytest.raises(TypeError, match="^t must be a torch.Tensor, got int"):
        shard_like(3, torch.ones(2))
    with pytest.raises(TypeError, match="^like must be a torch.Tensor, got list"):
        shard_like(torch.ones(2), [1, 2])
    t = torch.ones(2)
    assert shard_like(t, torch.zeros(2)) is t


def test_shard_like_names_a_meta_tensor_laid_out_like_a_dtensor(monkeypatch):
    """A meta tensor laid out like a DTensor failed with "Cannot copy out of meta tensor;
    no data!"; it is named (a one-process gloo group)."""
    import socket

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from sparsekit.distributed import shard_like

    if dist.is_initialized():
        pytest.skip("a process group runs already")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        like = distribute_tensor(torch.ones(4, 4), init_device_mesh("cpu", (1,)), [Shard(0)])
        with pytest.raises(ValueError, match="^t is on the meta device"):
            shard_like(torch.ones(4, 4, device="meta"), like)
        assert torch.equal(shard_like(torch.full((4, 4), 2.0), like).full_tensor(),
                           torch.full((4, 4), 2.0))
    finally:
        dist.destroy_process_group()


def test_hf_model_init_builds_the_functions_schedule_afresh_for_each_new_model(tmp_path):
    """Trainer(model_init=...) builds a new model (and optimizer) for each train(): the
    second train() refused the DynamicSparsity the function had built for the first
    model ("built on another optimizer …; pass a function" — one was passed). The function
    now builds afresh for the new model, not carrying the first model's masks over."""
    transformers = pytest.importorskip("transformers")
    from sparsekit.integrations.hf import SparsityCallback

    def build(model, optimizer):
        return sparsekit.DynamicSparsity(model, optimizer, 0.7, method="rigl", every=1,
                                         end_step=10, allocation="uniform")

    callback = SparsityCallback(build)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, use_cpu=True,
        report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True)
    trainer = transformers.Trainer(model_init=_bert, args=args, train_dataset=_Data(),
                                   callbacks=[callback])
    trainer.train()
    first = callback.schedule
    trainer.train()
    assert callback.schedule is not first and callback.schedule.step_count == 2
    weights = dict(trainer.model.named_parameters())
    for n, m in callback.masks.masks.items():
        assert callback.masks.params[n] is weights[n] and (weights[n][~m] == 0).all()
