"""sparsekit.integrations.hf.SparsityCallback in real Hugging Face Trainer runs (tiny BERT, CPU)."""

import re
import types

import pytest
import torch

import sparsekit
from sparsekit import DynamicSparsity, GradualPruner, IterativePruning

transformers = pytest.importorskip("transformers")
from sparsekit.integrations.hf import STATE_FILE, SparsityCallback  # noqa: E402

STEPS = 3


def _bert() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64,
                                     max_position_embeddings=32, num_labels=2)
    return transformers.BertForSequenceClassification(config)


class _Data(torch.utils.data.Dataset):
    def __init__(self, n: int = 16, length: int = 8) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, 64, (n, length), generator=g)
        self.labels = torch.randint(0, 2, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]),
                "labels": self.labels[i]}


class _CheckZeros(transformers.TrainerCallback):
    """After every optimizer step: the masked weights of the callback's masks are zero."""

    def __init__(self, sparsity: SparsityCallback) -> None:
        self.sparsity, self.steps, self.sparsities = sparsity, 0, []

    def on_step_end(self, args, state, control, **kwargs):
        masks = self.sparsity.masks
        for n, p in masks.params.items():
            assert (p[~masks.masks[n]] == 0).all(), f"{n} revived at step {state.global_step}"
        self.steps += 1
        self.sparsities.append(masks.sparsity())


def _train(model, sparsity, tmp_path, **args):
    callback = SparsityCallback(sparsity)
    check = _CheckZeros(callback)
    training = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=4,
        learning_rate=1e-2, use_cpu=True, report_to=[], save_strategy="no",
        logging_strategy="no", disable_tqdm=True, **args)
    trainer = transformers.Trainer(model=model, args=training, train_dataset=_Data(),
                                   callbacks=[callback, check])
    trainer.train()
    assert check.steps == STEPS
    return trainer, callback, check


def test_trainer_keeps_masks_and_saves_the_zeros(tmp_path):
    """Attaching inside a Trainer raised AttributeError ('AcceleratedOptimizer' object has
    no attribute '_optimizer_step_pre_hooks')."""
    model = _bert()
    masks = sparsekit.prune(model, 0.5)
    before = {n: p.detach().clone() for n, p in masks.params.items()}
    trainer, callback, _ = _train(model, masks, tmp_path)
    assert callback.masks is masks
    assert any(not torch.equal(before[n], p) for n, p in masks.params.items())  # it trained
    assert not masks._optimizers  # detached at train end
    trainer.save_model(str(tmp_path / "saved"))
    saved = transformers.BertForSequenceClassification.from_pretrained(str(tmp_path / "saved"))
    weights = dict(saved.named_parameters())
    for n, m in masks.masks.items():
        assert (weights[n].detach()[~m] == 0).all()


def test_trainer_gradual_schedule_reaches_its_target(tmp_path):
    model = _bert()
    gradual = GradualPruner(model, 0.8, start_step=0, end_step=STEPS, every=1)
    _, callback, check = _train(model, gradual, tmp_path)
    assert callback.schedule is gradual and gradual.step_count == STEPS
    assert check.sparsities == sorted(check.sparsities)  # rises step by step
    assert gradual.masks.sparsity() == pytest.approx(0.8, abs=0.01)


@pytest.mark.parametrize("method", ["set", "rigl"])
def test_trainer_dynamic_sparsity_built_on_the_trainers_optimizer(tmp_path, method):
    model = _bert()
    _, callback, check = _train(
        model,
        lambda m, opt: DynamicSparsity(m, opt, 0.7, method=method, every=1, end_step=STEPS,
                                       allocation="uniform"),
        tmp_path, gradient_accumulation_steps=2)
    dst = callback.schedule
    assert dst.step_count == STEPS  # optimizer steps, not micro-batches
    assert dst.masks.sparsity() == pytest.approx(0.7, abs=0.01)
    assert check.sparsities == pytest.approx([0.7] * STEPS, abs=0.01)


def test_trainer_iterative_pruning_one_train_per_round(tmp_path):
    model = _bert()
    imp = IterativePruning(model, rounds=2, sparsity=0.75, rewind_step=1)
    callback = SparsityCallback(imp)
    check = _CheckZeros(callback)
    training = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=4,
        learning_rate=1e-2, use_cpu=True, report_to=[], save_strategy="no",
        logging_strategy="no", disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=training, train_dataset=_Data(),
                                   callbacks=[callback, check])
    while True:
        trainer.train()
        if not imp.next_round():
            break
    assert check.steps == 2 * STEPS and imp.round == 2
    assert imp.masks.sparsity() == pytest.approx(0.75, abs=0.01)
    for n, p in imp.masks.params.items():
        assert (p[~imp.masks.masks[n]] == 0).all()


def test_trainer_resumes_the_schedule_from_a_checkpoint(tmp_path):
    """Each checkpoint holds the schedule's state: a run resumed from step 2 ends with the
    masks and step count of the run that never stopped."""

    def run(resume: bool):
        model = _bert()
        gradual = GradualPruner(model, 0.8, start_step=0, end_step=4, every=1)
        training = transformers.TrainingArguments(
            output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4,
            learning_rate=1e-2, use_cpu=True, report_to=[], save_strategy="steps",
            save_steps=2, logging_strategy="no", disable_tqdm=True, data_seed=0, seed=0)
        trainer = transformers.Trainer(model=model, args=training, train_dataset=_Data(),
                                       callbacks=[SparsityCallback(gradual)])
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2") if resume else None)
        return gradual

    whole = run(resume=False)
    assert (tmp_path / "checkpoint-2" / STATE_FILE).is_file()
    resumed = run(resume=True)
    assert resumed.step_count == whole.step_count == 4
    for n, m in whole.masks.masks.items():
        assert torch.equal(resumed.masks.masks[n], m)


def test_callback_refuses_what_is_no_sparsity():
    with pytest.raises(TypeError, match="sparsity must be a MaskSet, a schedule"):
        SparsityCallback(0.5)


@pytest.mark.parametrize("content", [b"garbage", b"", b"PK\x03\x04", {"step": 1}],
                         ids=["pickle", "empty", "zip", "another state"])
def test_resume_from_a_file_that_holds_no_state(tmp_path, content):
    """The checkpoint's state is read and loaded before anything is attached: a bad file is
    a ValueError naming it, with no hooks on the optimizer, nothing attached and the
    weights as they were (it raised a raw UnpicklingError after attaching)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    masks = sparsekit.prune(model, 0.5)
    before = model[0].weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    saved = tmp_path / "checkpoint-5" / STATE_FILE
    saved.parent.mkdir()
    if isinstance(content, bytes):
        saved.write_bytes(content)
    else:
        torch.save(content, saved)
    callback = SparsityCallback(masks)
    with pytest.raises(ValueError, match=rf"{re.escape(str(saved))} is no state"):
        callback.on_train_begin(types.SimpleNamespace(output_dir=str(tmp_path)),
                                types.SimpleNamespace(global_step=5), None,
                                model=model, optimizer=optimizer)
    assert callback.attached is None and not masks._optimizers
    assert not optimizer._optimizer_step_pre_hooks and not optimizer._optimizer_step_post_hooks
    assert torch.equal(model[0].weight, before)
