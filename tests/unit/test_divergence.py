"""The divergence guard: a non-finite step is never applied, and the job stops (or skips, up to a limit)."""

from __future__ import annotations

import pytest
import torch

from kubetrain.api import TrainingSpec
from kubetrain_trainer.checkpoint_state import TrainState
from kubetrain_trainer.divergence import NonFiniteGuard, update_skipped_if_non_finite
from kubetrain_trainer.failures import Diverged
from kubetrain_trainer.optim import build_optimizer

CPU = torch.device("cpu")
FINITE, NAN = torch.tensor(1.0), torch.tensor(float("nan"))


def step_with(model: torch.nn.Module, optimizer, grad_value: float) -> torch.Tensor:
    for p in model.parameters():
        p.grad = torch.full_like(p, grad_value)
    norm = torch.nn.utils.clip_grad_norm_(list(model.parameters()), 1.0)
    with update_skipped_if_non_finite(optimizer, norm):
        optimizer.step()
    return norm


def test_a_non_finite_update_changes_no_weight_no_moment_and_no_step_count():
    model = torch.nn.Linear(4, 3)
    optimizer = build_optimizer(model, TrainingSpec(learningRate=0.1, weightDecay=0.1), CPU)
    step_with(model, optimizer, 0.5)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    moments = {id(p): {k: v.clone() for k, v in optimizer.state[p].items()} for p in model.parameters()}
    step_with(model, optimizer, float("nan"))
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    for p in model.parameters():
        assert all(torch.equal(moments[id(p)][k], v) for k, v in optimizer.state[p].items())
    step_with(model, optimizer, 0.5)
    assert not torch.equal(weights["weight"], model.weight) and torch.isfinite(model.weight).all()
    assert int(optimizer.state[model.weight]["step"]) == 2


def test_fail_names_the_first_non_finite_step():
    guard = NonFiniteGuard(TrainingSpec(), TrainState(), CPU, scaler_enabled=False)
    for step in range(1, 5):
        guard.record(step, FINITE, FINITE)
    guard.check()
    guard.record(5, FINITE, NAN)
    guard.record(6, NAN, NAN)
    with pytest.raises(Diverged, match=r"non-finite loss or gradient norm at step 5 \(training.onNonFinite: fail\)"):
        guard.check()


def test_skip_goes_on_until_the_limit_and_counts_across_checks():
    state = TrainState()
    guard = NonFiniteGuard(TrainingSpec(onNonFinite="skip", nonFiniteSkipLimit=2), state, CPU, scaler_enabled=False)
    guard.record(3, NAN, NAN)
    guard.check()
    guard.record(7, FINITE, torch.tensor(float("inf")))
    guard.check()
    assert state.non_finite_skips == 2
    guard.record(9, NAN, FINITE)
    with pytest.raises(Diverged, match=r"3 steps with a non-finite loss or gradient norm, the latest from step 9, "
                                       r"over training.nonFiniteSkipLimit 2"):
        guard.check()


def test_under_fp16_an_overflowed_gradient_is_the_scalers_skipped_step_not_divergence():
    guard = NonFiniteGuard(TrainingSpec(precision="fp16"), TrainState(), CPU, scaler_enabled=True)
    guard.record(1, FINITE, torch.tensor(float("inf")))
    guard.check()
    guard.record(2, NAN, FINITE)
    with pytest.raises(Diverged, match="non-finite loss at step 2"):
        guard.check()
