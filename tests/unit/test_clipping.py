"""Clipping folded into fused AdamW (clipping.py) gives the update and the gradients that clipping in place
gives (the update scales them in its own pass); other optimizers still clip in place."""

from __future__ import annotations

import pytest
import torch

from kubetrain_trainer.clipping import clip_gradients, divided_in_update


def trained(fused: bool, folded: bool, max_norm: float | None, steps: int = 3):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, fused=fused, foreach=None if fused else False)
    params = list(model.parameters())
    norms, seen = [], []
    for step in range(steps):
        x = torch.randn(32, 8, generator=torch.Generator().manual_seed(step))
        (100 * model(x).pow(2).sum()).backward()  # norms far above max_norm: every step clips
        if folded:
            norm, divisor = clip_gradients(optimizer, params, max_norm, scaler_enabled=False)
            with divided_in_update(optimizer, divisor):
                optimizer.step()
            assert not hasattr(optimizer, "grad_scale")
        else:
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm or float("inf"))
            optimizer.step()
        norms.append(float(norm))
        seen.append([p.grad.clone() for p in params])  # clipped, either way
        optimizer.zero_grad(set_to_none=True)
    return [p.detach().clone() for p in params], norms, seen


@pytest.mark.parametrize("max_norm", [1.0, None], ids=["clips", "unset"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "not-fused"])
def test_clipping_in_the_update_equals_clipping_in_place(fused, max_norm):
    want, want_norms, want_grads = trained(fused, folded=False, max_norm=max_norm)
    got, got_norms, got_grads = trained(fused, folded=True, max_norm=max_norm)
    assert got_norms == pytest.approx(want_norms, rel=1e-6)
    assert min(want_norms) > 10  # the gradients were far above the cap
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for step_got, step_want in zip(got_grads, want_grads):
        for a, b in zip(step_got, step_want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_without_clipping_the_norm_is_the_update_differs():
    """The folded divisor matters: the same gradients, unclipped, give another update (the test above can fail)."""
    clipped, *_ = trained(True, folded=True, max_norm=1.0)
    unclipped, *_ = trained(True, folded=True, max_norm=None)
    assert any(not torch.allclose(a, b, atol=1e-4) for a, b in zip(clipped, unclipped))
