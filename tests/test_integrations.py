"""sparsekit.integrations: masks and schedules attach to the optimizers training frameworks
hand out (wrappers), step with the steps those really take, and import no framework."""

import gc
import subprocess
import sys

import pytest
import torch
from torch import nn

import sparsekit
import sparsekit.integrations.accelerate
from sparsekit import DynamicSparsity, GradualPruner, integrations


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def _train(model: nn.Module, optimizer, steps: int = 3, after_step=lambda: None) -> None:
    x, y = torch.randn(16, 8), torch.randint(0, 4, (16,))
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        after_step()


class _Wrapper:
    """What a framework's wrapper looks like: the real optimizer as ``.optimizer``."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def step(self, closure=None):
        return self.optimizer.step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none)


def _accelerated(optimizer: torch.optim.Optimizer):
    accelerate = pytest.importorskip("accelerate")
    return accelerate.Accelerator(cpu=True).prepare_optimizer(optimizer)


def _lightning(optimizer: torch.optim.Optimizer):
    core = pytest.importorskip("lightning.pytorch.core.optimizer")
    return core.LightningOptimizer(optimizer)


WRAPPERS = {
    "accelerate": _accelerated,
    "lightning": _lightning,
    "plain wrapper": _Wrapper,
    "wrapper of wrapper": lambda o: _Wrapper(_Wrapper(o)),
}


@pytest.mark.parametrize("wrap", list(WRAPPERS.values()), ids=list(WRAPPERS))
def test_maskset_attaches_through_wrapped_optimizer(wrap):
    """Attaching to accelerate's AcceleratedOptimizer raised AttributeError
    ('_optimizer_step_pre_hooks'); a wrapper without it was refused."""
    model = _model()
    inner = torch.optim.Adam(model.parameters(), lr=0.1)
    wrapped = wrap(inner)
    masks = sparsekit.prune(model, 0.5).attach(wrapped)
    assert list(masks._optimizers.values()) == [inner]  # hooks on the optimizer that steps
    _train(model, inner)  # what every wrapper's step() does (Lightning's needs its Trainer)
    for n, p in masks.params.items():
        assert (p[~masks.masks[n]] == 0).all()
    masks.detach(wrapped)
    assert not masks._optimizers


@pytest.mark.parametrize("wrap", [_accelerated, _lightning], ids=["accelerate", "lightning"])
def test_schedules_attach_through_wrapped_optimizer(wrap):
    model = _model()
    inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    gradual = GradualPruner(model, 0.75, start_step=0, end_step=2, every=1, optimizer=wrap(inner))
    _train(model, inner, steps=2, after_step=gradual.step)
    assert gradual.masks.sparsity() == pytest.approx(0.75, abs=0.01)
    for n, p in gradual.masks.params.items():
        assert (p[~gradual.masks.masks[n]] == 0).all()

    model = _model()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    dst = DynamicSparsity(model, wrap(inner), 0.5, method="rigl", every=1, end_step=3,
                          allocation="uniform")
    assert dst.optimizer is inner
    before = {n: m.clone() for n, m in dst.masks.masks.items()}
    _train(model, inner, steps=2, after_step=dst.step)
    assert any(not torch.equal(before[n], m) for n, m in dst.masks.masks.items())
    for n, p in dst.masks.params.items():
        assert (p[~dst.masks.masks[n]] == 0).all()


@pytest.mark.parametrize("bad", [None, object(), "adam", _Wrapper(object())],
                         ids=["None", "object", "str", "wrapper of nothing"])
def test_attach_refuses_what_wraps_no_optimizer(bad):
    masks = sparsekit.prune(_model(), 0.5)
    with pytest.raises(TypeError, match=r"optimizer must be a torch.optim.Optimizer or a wrapper"):
        masks.attach(bad)


def test_attach_refuses_a_wrapper_cycle():
    cycle = _Wrapper(None)
    cycle.optimizer = _Wrapper(cycle)
    with pytest.raises(TypeError, match="optimizer must be"):
        sparsekit.prune(_model(), 0.5).attach(cycle)


def test_import_integrations_imports_no_framework():
    probe = ("import sys, sparsekit, sparsekit.integrations\n"
             "print(' '.join(m for m in ('transformers', 'lightning', 'accelerate') "
             "if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=900, check=True)
    assert done.stdout.split() == []


def test_attach_steps_the_schedule_once_per_real_step():
    """Gradient accumulation: the AcceleratedOptimizer skips steps between syncs, and so
    does the schedule (stepping it per micro-batch would run ahead of training)."""
    accelerate = pytest.importorskip("accelerate")
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = _model()
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    gradual = GradualPruner(accelerator.unwrap_model(model), 0.75, start_step=0, end_step=3,
                            every=1)
    sparsity = integrations.accelerate.attach(accelerator, gradual, model, optimizer)
    x, y = torch.randn(16, 8), torch.randint(0, 4, (16,))
    for _ in range(6):  # 6 micro-batches, 3 optimizer steps
        with accelerator.accumulate(model):
            accelerator.backward(nn.functional.cross_entropy(model(x), y))
            optimizer.step()
            optimizer.zero_grad()
        for n, p in gradual.masks.params.items():
            assert (p[~gradual.masks.masks[n]] == 0).all()
    assert gradual.step_count == 3
    assert gradual.masks.sparsity() == pytest.approx(0.75, abs=0.01)
    sparsity.remove()
    optimizer.step()  # detached: no more schedule steps
    assert gradual.step_count == 3


def test_attach_builds_dynamic_sparsity_on_the_real_optimizer():
    model = _model()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    wrapped = _Wrapper(inner)
    attached = integrations.attach(
        lambda m, opt: DynamicSparsity(m, opt, 0.5, method="rigl", every=1, end_step=3,
                                       allocation="uniform"),
        model, wrapped)
    assert attached.optimizer is inner and attached.schedule.optimizer is inner
    before = {n: m.clone() for n, m in attached.masks.masks.items()}
    _train(model, wrapped, steps=2)
    assert attached.schedule.step_count == 2
    assert any(not torch.equal(before[n], m) for n, m in attached.masks.masks.items())


def test_attach_refuses_a_schedule_of_another_optimizer():
    model = _model()
    dst = DynamicSparsity(model, torch.optim.SGD(model.parameters(), lr=0.1), 0.5, end_step=3)
    other = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="built on another optimizer"):
        integrations.attach(dst, model, other)
    assert not dst.masks._optimizers.get(id(other))  # nothing attached


def test_attach_refuses_a_schedule_attached_already():
    """Two hooks would step it twice per optimizer step, and removing one would leave it
    stepping; after remove() it attaches again. The handle need not be kept (r5)."""
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    gradual = GradualPruner(model, 0.75, start_step=0, end_step=10, every=1,
                            optimizer=optimizer)
    integrations.attach(gradual, model, optimizer)
    gc.collect()  # the dropped handle lives on in the hook
    hooks = (len(optimizer._optimizer_step_pre_hooks), len(optimizer._optimizer_step_post_hooks))
    for again in (optimizer, _Wrapper(optimizer)):
        with pytest.raises(ValueError, match="sparsity: this GradualPruner is attached already"):
            integrations.attach(gradual, model, again)
        with pytest.raises(ValueError, match="attached already"):
            integrations.attach(lambda m, o: gradual, model, again)
    assert hooks == (len(optimizer._optimizer_step_pre_hooks),
                     len(optimizer._optimizer_step_post_hooks))
    _train(model, optimizer, steps=1)
    assert gradual.step_count == 1


def test_attach_again_after_remove():
    model = _model()
    gradual = GradualPruner(model, 0.75, start_step=0, end_step=10, every=1)
    first = integrations.attach(gradual, model, torch.optim.SGD(model.parameters(), lr=0.1))
    first.remove()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    again = integrations.attach(gradual, model, optimizer)
    _train(model, optimizer, steps=2)
    assert gradual.step_count == 2
    again.remove()
    _train(model, optimizer, steps=1)
    assert gradual.step_count == 2


@pytest.mark.parametrize("bad", [0.5, "rigl", None], ids=["float", "str", "None"])
def test_attach_refuses_what_is_no_sparsity(bad):
    model = _model()
    with pytest.raises(TypeError, match="sparsity must be a MaskSet, a schedule"):
        integrations.attach(bad, model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(TypeError, match="sparsity: the function must return"):
        integrations.attach(lambda m, o: bad, model, torch.optim.SGD(model.parameters(), lr=0.1))


@pytest.mark.parametrize("positional", [True, False], ids=["step(closure)", "step(closure=)"])
def test_a_step_with_a_closure_masks_and_captures_its_own_gradients(positional):
    """Lightning steps with a closure that computes the gradients inside step(): the
    pre-step hooks read the previous step's (RigL: 'needs the dense gradient' at step 1;
    Adam's moments filled at masked positions)."""
    model = _model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    dst = DynamicSparsity(model, optimizer, 0.5, method="rigl", every=1, end_step=4,
                          allocation="uniform")
    x, y = torch.randn(16, 8), torch.randint(0, 4, (16,))

    def closure():
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    for _ in range(3):
        optimizer.step(closure) if positional else optimizer.step(closure=closure)
        dst.step()
        for n, p in dst.masks.params.items():
            masked = ~dst.masks.masks[n]
            assert (p[masked] == 0).all()
            assert (optimizer.state[p]["exp_avg"][masked] == 0).all()
