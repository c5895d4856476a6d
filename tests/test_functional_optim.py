"""The pure optimisers against torch.optim and closed forms."""

import pytest
import torch

from yolozu.functional import optim
from yolozu.functional.optim import adam, apply_updates, chain, clip_by_global_norm, global_norm, sgd


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "conv.weight": torch.randn(4, 3, 3, 3, generator=g),
        "bn.bias": torch.randn(4, generator=g),
        "fc.weight": torch.randn(5, 4, generator=g),
    }


def _run_both(transform, torch_opt_factory, steps=10):
    params = _params()
    state = transform.init(params)
    ours = dict(params)
    theirs = [p.clone().requires_grad_(True) for p in params.values()]
    opt = torch_opt_factory(theirs)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        grads = {k: torch.randn(v.shape, generator=g) for k, v in params.items()}
        updates, state = transform.update(grads, state, ours)
        ours = apply_updates(ours, updates)
        for t, grad in zip(theirs, grads.values()):
            t.grad = grad.clone()
        opt.step()
    return ours, dict(zip(params, theirs))


@pytest.mark.parametrize("lr,betas,eps", [(1e-3, (0.9, 0.999), 1e-8), (5e-2, (0.8, 0.99), 1e-6)])
def test_adam_matches_torch(lr, betas, eps):
    ours, theirs = _run_both(adam(lr, *betas, eps), lambda p: torch.optim.Adam(p, lr=lr, betas=betas, eps=eps))
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name].detach(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("momentum,nesterov", [(0.0, False), (0.9, False), (0.9, True)])
def test_sgd_matches_torch(momentum, nesterov):
    ours, theirs = _run_both(
        sgd(0.05, momentum, nesterov), lambda p: torch.optim.SGD(p, lr=0.05, momentum=momentum, nesterov=nesterov)
    )
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name].detach(), rtol=0, atol=1e-6)


def test_clip_by_global_norm_closed_form():
    grads = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([[4.0]])}  # global norm 5
    clipped, _ = clip_by_global_norm(1.0).update(grads, clip_by_global_norm(1.0).init(grads))
    assert torch.allclose(global_norm(clipped), torch.tensor(1.0))
    assert torch.allclose(clipped["a"], torch.tensor([0.6, 0.0]))
    untouched, _ = clip_by_global_norm(10.0).update(grads, ())
    assert all(torch.equal(untouched[k], grads[k]) for k in grads)


def test_chain_applies_in_order_and_keeps_each_state():
    grads = {"a": torch.tensor([30.0, 40.0])}
    tx = chain(clip_by_global_norm(5.0), sgd(0.1))
    updates, state = tx.update(grads, tx.init(grads))
    assert torch.allclose(updates["a"], torch.tensor([-0.3, -0.4]))
    assert len(state) == 2 and int(state[1].count) == 1


def test_updates_leave_inputs_unchanged():
    params = _params()
    grads = {k: torch.ones_like(v) for k, v in params.items()}
    before = {k: v.clone() for k, v in params.items()}
    for tx in (adam(0.1), sgd(0.1, 0.9), chain(clip_by_global_norm(0.5), adam(0.1))):
        state = tx.init(params)
        updates, new_state = tx.update(grads, state, params)
        updates2, _ = tx.update(grads, new_state, params)
        assert all(torch.equal(params[k], before[k]) for k in params)
        assert all(torch.equal(grads[k], torch.ones_like(grads[k])) for k in grads)
        apply_updates(params, updates2)
        assert all(torch.equal(params[k], before[k]) for k in params)


def test_foreach_and_per_tensor_paths_agree_under_vmap():
    params = _params()
    grads = {k: torch.randn_like(v) for k, v in params.items()}
    tx = chain(clip_by_global_norm(1.0), adam(0.01))
    direct, _ = tx.update(grads, tx.init(params), params)

    def one(g):
        updates, _ = tx.update(g, tx.init(params), params)
        return updates

    batched = torch.func.vmap(one)({k: torch.stack([v, v]) for k, v in grads.items()})
    for k in direct:
        torch.testing.assert_close(batched[k][1], direct[k], rtol=1e-6, atol=1e-7)


def test_build_rejects_unknown_optimizer():
    with pytest.raises(ValueError, match="choose one of adam, sgd"):
        optim.build("lion", 1e-3)


def test_pull_to_start_closed_form():
    params = _params()
    tx = chain(sgd(0.1), optim.pull_to_start(0.25))
    state = tx.init(params)
    moved = {k: v + 1.0 for k, v in params.items()}
    grads = {k: torch.full_like(v, 2.0) for k, v in params.items()}
    updates, _ = tx.update(grads, state, moved)
    for k in params:  # -lr g + rate (start - params) = -0.2 - 0.25
        torch.testing.assert_close(updates[k], torch.full_like(params[k], -0.45))


def test_pull_to_start_bounds_the_drift_of_a_constant_gradient():
    # p <- p - lr g + rate (start - p) has the fixed point start - lr g / rate; without the pull p runs away
    params = _params()
    lr, rate = 0.01, 0.1
    pulled, free = chain(sgd(lr), optim.pull_to_start(rate)), sgd(lr)
    grads = {k: torch.ones_like(v) for k, v in params.items()}
    ends = []
    for tx in (pulled, free):
        p, state = dict(params), tx.init(params)
        for _ in range(300):
            updates, state = tx.update(grads, state, p)
            p = apply_updates(p, updates)
        ends.append(p)
    for k in params:
        torch.testing.assert_close(ends[0][k], params[k] - lr / rate, rtol=0, atol=1e-5)
        torch.testing.assert_close(ends[1][k], params[k] - 300 * lr, rtol=0, atol=1e-4)


def test_pull_to_start_agrees_under_vmap_and_keeps_its_start():
    params = _params()
    tx = chain(adam(0.01), optim.pull_to_start(0.05))
    state = tx.init(params)
    moved = {k: v * 2 for k, v in params.items()}
    grads = {k: torch.randn_like(v) for k, v in params.items()}
    direct, after = tx.update(grads, state, moved)
    batched = torch.func.vmap(lambda g: tx.update(g, state, moved)[0])({k: torch.stack([v, v]) for k, v in
                                                                      grads.items()})
    for k in direct:
        torch.testing.assert_close(batched[k][0], direct[k], rtol=1e-6, atol=1e-7)
        assert torch.equal(after[1].start[k], params[k])


def test_build_adds_the_pull_only_when_asked():
    params = _params()
    grads = {k: torch.ones_like(v) for k, v in params.items()}
    moved = {k: v + 1.0 for k, v in params.items()}
    plain, _ = optim.build("sgd", 0.1, momentum=0.0).update(grads, optim.build("sgd", 0.1).init(params), moved)
    pulled_tx = optim.build("sgd", 0.1, momentum=0.0, source_pull=0.5)
    pulled, _ = pulled_tx.update(grads, pulled_tx.init(params), moved)
    for k in params:
        torch.testing.assert_close(plain[k], torch.full_like(params[k], -0.1))
        torch.testing.assert_close(pulled[k], torch.full_like(params[k], -0.6))
    with pytest.raises(ValueError, match=r"fraction in \[0, 1\]"):
        optim.pull_to_start(1.5)
