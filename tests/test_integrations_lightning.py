"""sparsekit.integrations.lightning.SparsityCallback in real Lightning Trainer runs (CPU)."""

import types

import pytest
import torch
from torch import nn

import sparsekit
from sparsekit import DynamicSparsity, GradualPruner

pl = pytest.importorskip("lightning.pytorch")
from sparsekit.integrations.lightning import SparsityCallback  # noqa: E402

STEPS = 3


class _Classifier(pl.LightningModule):
    def __init__(self, optimizers: int = 1) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
        self.optimizers_count = optimizers
        self.automatic_optimization = optimizers == 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, _index):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        optimizers = [torch.optim.AdamW(self.parameters(), lr=1e-2, fused=True)
                      for _ in range(self.optimizers_count)]
        return optimizers[0] if len(optimizers) == 1 else optimizers


class _CheckZeros(pl.Callback):
    def __init__(self, sparsity: SparsityCallback) -> None:
        self.sparsity, self.steps, self.sparsities = sparsity, 0, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        masks = self.sparsity.masks
        for n, p in masks.params.items():
            assert (p[~masks.masks[n]] == 0).all(), f"{n} revived at step {trainer.global_step}"
        self.steps += 1
        self.sparsities.append(masks.sparsity())


def _loader(batch_size: int = 8) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(32, 8, generator=g),
                                          torch.randint(0, 4, (32,), generator=g))
    return torch.utils.data.DataLoader(data, batch_size=batch_size)


def _fit(module: pl.LightningModule, sparsity) -> tuple[SparsityCallback, _CheckZeros]:
    callback = SparsityCallback(sparsity)
    check = _CheckZeros(callback)
    trainer = pl.Trainer(max_steps=STEPS, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[callback, check])
    trainer.fit(module, _loader())
    assert check.steps == STEPS
    return callback, check


def test_lightning_keeps_masks():
    module = _Classifier()
    masks = sparsekit.prune(module, 0.5)
    before = {n: p.detach().clone() for n, p in masks.params.items()}
    callback, _ = _fit(module, masks)
    assert callback.masks is masks and not masks._optimizers  # detached at the end
    assert any(not torch.equal(before[n], p) for n, p in masks.params.items())


def test_lightning_gradual_schedule_reaches_its_target():
    module = _Classifier()
    gradual = GradualPruner(module, 0.8, start_step=0, end_step=STEPS, every=1)
    _, check = _fit(module, gradual)
    assert gradual.step_count == STEPS
    assert check.sparsities == sorted(check.sparsities)
    assert gradual.masks.sparsity() == pytest.approx(0.8, abs=0.01)


def test_lightning_dynamic_sparsity_from_a_function():
    module = _Classifier()
    callback, check = _fit(module, lambda m, opt: DynamicSparsity(
        m, opt, 0.7, method="rigl", every=1, end_step=STEPS, allocation="uniform"))
    assert callback.schedule.step_count == STEPS
    assert check.sparsities == pytest.approx([0.7] * STEPS, abs=0.01)


def test_lightning_refuses_several_optimizers():
    module = _Classifier(optimizers=2)
    with pytest.raises(ValueError, match="exactly one optimizer.*gave 2"):
        _fit(module, sparsekit.prune(module, 0.5))


def test_lightning_checkpoint_resumes_the_schedule(tmp_path):
    def fit(steps: int, ckpt_path=None) -> tuple[GradualPruner, pl.Trainer]:
        module = _Classifier()
        gradual = GradualPruner(module, 0.8, start_step=0, end_step=4, every=1)
        trainer = pl.Trainer(max_steps=steps, accelerator="cpu", logger=False,
                             enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, callbacks=[SparsityCallback(gradual)])
        trainer.fit(module, _loader(batch_size=32), ckpt_path=ckpt_path)  # same batch each step
        return gradual, trainer

    whole, _ = fit(4)
    half, trainer = fit(2)
    trainer.save_checkpoint(tmp_path / "half.ckpt")
    resumed, _ = fit(4, ckpt_path=tmp_path / "half.ckpt")
    assert resumed.step_count == whole.step_count == 4
    for n, m in whole.masks.masks.items():
        assert torch.equal(resumed.masks.masks[n], m)


@pytest.mark.parametrize("state, named", [
    (None, "state_dict must be"),
    ({"sparsity": 5}, r"state_dict\['sparsity'\] must be"),
    ({"sparsity": {"masks": [1]}}, r"state_dict\['sparsity'\] must be"),
])
def test_load_state_dict_refuses_what_no_state_dict_returns(state, named):
    callback = SparsityCallback(sparsekit.prune(_Classifier(), 0.5))
    with pytest.raises(TypeError, match=named):
        callback.load_state_dict(state)
    assert callback._restored is None


def test_a_restored_state_that_does_not_fit_is_refused_before_attaching():
    """Its form is right, its masks are another model's: refused when training starts,
    before anything is attached."""
    module = _Classifier()
    masks = sparsekit.prune(module, 0.5)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    callback = SparsityCallback(masks)
    callback.load_state_dict({"sparsity": {"masks": {"nothere.weight": torch.ones(2)}}})
    with pytest.raises(ValueError, match=r"state_dict\['sparsity'\] is no state of this MaskSet"):
        callback.on_train_start(types.SimpleNamespace(optimizers=[optimizer]), module)
    assert callback.attached is None and not masks._optimizers
    assert not optimizer._optimizer_step_pre_hooks and not optimizer._optimizer_step_post_hooks
