"""Tent and MIM steps: purity, parity with classic stateful Tent, vmap over streams, BatchNorm modes."""

import copy

import pytest
import torch
from toy import TinyAutoencoder, TinyClassifier, seeded

from yolozu.bridge import make_apply
from yolozu.functional import filters, optim, rng, streams
from yolozu.functional.losses import masked_reconstruction_loss, softmax_entropy
from yolozu.functional.masking import apply_mask, block_mask, standardise_cells
from yolozu.functional.methods.mim import MIMSettings, mim_method
from yolozu.functional.methods.tent import make_tent_step
from yolozu.functional.step import grad_params, in_transform, init_state, make_step, make_update


def _batch(seed=0, n=6, size=12):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _clone_tree(tree):
    return torch.utils._pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, tree)


def _trees_equal(a, b):
    la, sa = torch.utils._pytree.tree_flatten(a)
    lb, sb = torch.utils._pytree.tree_flatten(b)
    return sa == sb and all(torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in zip(la, lb))


@pytest.mark.parametrize("bn", ["running", "batch", "eval"])
@pytest.mark.parametrize("differentiate", ["autograd", "func"])
def test_every_step_leaves_its_inputs_bitwise_unchanged(bn, differentiate):
    clf, ae = seeded(TinyClassifier), seeded(TinyAutoencoder)
    tx = optim.chain(optim.clip_by_global_norm(1.0), optim.adam(1e-2))
    x = _batch()
    cases = [
        (
            make_tent_step(make_apply(clf), tx, bn=bn, differentiate=differentiate),
            init_state(clf, filters.select(clf, "all"), tx),
            rng.key(0),
        ),
        (
            make_step(mim_method(make_apply(ae), tx, MIMSettings(patch_size=4), bn=bn), differentiate=differentiate),
            init_state(ae, filters.select(ae, "all"), tx),
            rng.key(0),
        ),
    ]
    for step, state, key in cases:
        state, _ = step(state, x, key)  # non-trivial optimiser state
        before_state, before_x = _clone_tree(state), x.clone()
        step(state, x, key)
        assert _trees_equal(state, before_state)
        assert torch.equal(x, before_x)
    module_before = {k: v.clone() for k, v in clf.state_dict().items()}
    assert all(torch.equal(v, module_before[k]) for k, v in clf.state_dict().items())


def test_five_functional_tent_steps_equal_classic_stateful_tent():
    model = seeded(TinyClassifier)
    classic = copy.deepcopy(model)
    names = filters.select(model, "norm_only")
    tx = optim.adam(1e-2)
    step = make_tent_step(make_apply(model), tx, bn="running")
    state = init_state(model, names, tx)
    batches = [_batch(seed) for seed in range(5)]
    for x in batches:
        state, _ = step(state, x, None)

    classic.train()
    for name, p in classic.named_parameters():
        p.requires_grad_(name in names)
    opt = torch.optim.Adam([p for p in classic.parameters() if p.requires_grad], lr=1e-2)
    for x in batches:
        loss = softmax_entropy(classic(x), dim=1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    params = dict(classic.named_parameters())
    for name in names:
        torch.testing.assert_close(state.trainable[name], params[name].detach(), rtol=0, atol=1e-5)
    for name, buf in classic.named_buffers():
        torch.testing.assert_close(state.buffers[name], buf, rtol=0, atol=1e-5)
    assert int(state.buffers["bn1.num_batches_tracked"]) == 5


def test_bn_modes_running_batch_eval():
    model = seeded(TinyClassifier)
    tx = optim.adam(1e-2)
    state = init_state(model, filters.select(model, "norm_only"), tx)
    x = _batch() * 3 + 1
    new = {bn: make_tent_step(make_apply(model), tx, bn=bn)(state, x, None)[0] for bn in ("running", "batch", "eval")}
    assert not torch.equal(new["running"].buffers["bn1.running_mean"], state.buffers["bn1.running_mean"])
    for bn in ("batch", "eval"):
        assert _trees_equal(new[bn].buffers, state.buffers)
    # batch and running normalise identically (batch statistics): same gradient step
    for name in state.trainable:
        torch.testing.assert_close(new["batch"].trainable[name], new["running"].trainable[name])
    assert not torch.equal(new["eval"].trainable["bn1.weight"], new["batch"].trainable["bn1.weight"])


def test_tent_step_vmapped_over_four_states_equals_four_separate_steps():
    model = seeded(TinyClassifier)
    tx = optim.chain(optim.clip_by_global_norm(1.0), optim.adam(1e-2))
    source = init_state(model, filters.select(model, "lora_norm_only"), tx)
    batches = torch.stack([_batch(seed) for seed in range(4)])
    loop_step = make_tent_step(make_apply(model), tx)
    singles = [source] * 4
    stacked = streams.replicate(source, 4)
    vstep = streams.vmap_step(make_tent_step(make_apply(model), tx, differentiate="func"))
    for _ in range(2):
        singles = [loop_step(s, b, None)[0] for s, b in zip(singles, batches)]
        stacked, metrics = vstep(stacked, batches)
    assert metrics["loss"].shape == (4,)
    for single, streamed in zip(singles, streams.unstack_states(stacked, 4)):
        for name in single.trainable:
            torch.testing.assert_close(streamed.trainable[name], single.trainable[name], rtol=1e-5, atol=1e-6)
        for name in single.buffers:
            torch.testing.assert_close(streamed.buffers[name], single.buffers[name], rtol=1e-5, atol=1e-6)


def test_mim_update_vmapped_with_per_stream_masks_equals_loop():
    model = seeded(TinyAutoencoder)
    # SGD, not Adam: a conv bias before BatchNorm has a zero gradient up to rounding, and Adam's first step
    # (about lr * sign(g)) would turn rounding noise into a visible difference.
    tx = optim.sgd(0.1, momentum=0.9)
    source = init_state(model, filters.select(model, "all"), tx)
    x = torch.rand(3, 2, 3, 16, 16, generator=torch.Generator().manual_seed(0))

    masks = torch.stack([block_mask(rng.key(i), 2, 16, 16, patch_size=4, mask_prob=0.5) for i in range(3)])
    update = make_update(mim_method(make_apply(model), tx))
    loop = [update(source, x[i], masks[i])[0] for i in range(3)]
    vmapped, metrics = streams.vmap_step(make_update(mim_method(make_apply(model), tx), differentiate="func"))(
        streams.replicate(source, 3), x, masks
    )
    torch.testing.assert_close(metrics["mask_ratio"], masks.float().mean(dim=(1, 2, 3, 4)))
    for single, streamed in zip(loop, streams.unstack_states(vmapped, 3)):
        for name in single.trainable:
            torch.testing.assert_close(streamed.trainable[name], single.trainable[name], rtol=1e-5, atol=1e-6)


def test_mim_loss_falls_over_twenty_steps():
    model = seeded(TinyAutoencoder)
    tx = optim.adam(1e-2)
    step = make_step(mim_method(make_apply(model), tx, MIMSettings(patch_size=4, mask_prob=0.5)))
    state = init_state(model, filters.select(model, "all"), tx)
    # a smooth image: the masked blocks are predictable from their surroundings
    ramp = torch.linspace(0, 1, 16)
    x = torch.stack([ramp[None, :].expand(16, 16), ramp[:, None].expand(16, 16), torch.full((16, 16), 0.8)])
    x = x.expand(4, 3, 16, 16)
    root = rng.key(0)
    losses = []
    for i in range(20):
        state, metrics = step(state, x, rng.fold_in(root, i))
        losses.append(float(metrics["loss"]))
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5


def test_mim_norm_pix_loss_is_the_masked_error_of_the_standardised_cells():
    model = seeded(TinyAutoencoder)
    tx = optim.sgd(0.1)
    state = init_state(model, filters.select(model, "all"), tx)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    mask = block_mask(rng.key(3), 2, 16, 16, patch_size=4, mask_prob=0.5)
    settings = MIMSettings(patch_size=4, norm_pix_loss=True)
    _, metrics = make_update(mim_method(make_apply(model), tx, settings))(state, x, mask)
    with torch.no_grad():
        model.train()
        recon = model(apply_mask(x, mask))
    expected = masked_reconstruction_loss(standardise_cells(recon, 4), standardise_cells(x, 4), mask)
    torch.testing.assert_close(metrics["loss"], expected, rtol=1e-5, atol=1e-6)
    raw = make_update(mim_method(make_apply(model), tx, MIMSettings(patch_size=4)))(state, x, mask)[1]["loss"]
    torch.testing.assert_close(raw, masked_reconstruction_loss(recon, x, mask), rtol=1e-5, atol=1e-6)


def test_metrics_are_consistent_with_the_update():
    model = seeded(TinyClassifier)
    tx = optim.sgd(0.1)
    state = init_state(model, filters.select(model, "norm_only"), tx)
    new, metrics = make_tent_step(make_apply(model), tx)(state, _batch(), None)
    diff = optim.tree_sub(new.trainable, state.trainable)
    torch.testing.assert_close(metrics["update_norm"], optim.global_norm(diff))
    torch.testing.assert_close(metrics["update_norm"], 0.1 * metrics["grad_norm"])
    torch.testing.assert_close(metrics["total_update_norm"], metrics["update_norm"])
    assert metrics["initial_loss"] == metrics["loss"] and bool(metrics["finite"])
    assert int(new.step) == 1


class Tied(torch.nn.Module):
    """Two layers sharing one weight: the forward must see the same tensor at both names."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(4, 4, bias=False)
        self.b = torch.nn.Linear(4, 4, bias=False)
        self.b.weight = self.a.weight
        self.bn = torch.nn.BatchNorm1d(4)

    def forward(self, x):
        return self.bn(self.b(torch.relu(self.a(x))))


@pytest.mark.parametrize("factory", [TinyClassifier, Tied])
def test_apply_equals_the_module_forward_and_restores_the_module(factory):
    from yolozu.functional.state import extract

    model = seeded(factory)
    x = torch.randn(6, 3, 12, 12) if factory is TinyClassifier else torch.randn(6, 4)
    params, buffers = extract(model)
    params = {name: p + 0.5 for name, p in params.items()}  # different from the module's own tensors
    out, _ = make_apply(model)(params, buffers, x, bn_mode="eval")
    reference = torch.func.functional_call(model.eval(), (params, buffers), (x,))
    torch.testing.assert_close(out, reference)
    assert all(isinstance(p, torch.nn.Parameter) for p in model.parameters())
    assert not torch.equal(model(x), out)


def test_apply_rejects_unknown_names():
    from yolozu.functional.state import extract

    model = seeded(TinyClassifier)
    params, buffers = extract(model)
    with pytest.raises(KeyError, match="not a parameter or buffer"):
        make_apply(model)({**params, "ghost.weight": torch.zeros(1)}, buffers, torch.randn(2, 3, 8, 8), bn_mode="eval")
    with pytest.raises(ValueError, match="BatchNorm mode 'frozen'"):
        make_apply(model)(params, buffers, torch.randn(2, 3, 8, 8), bn_mode="frozen")


def test_grad_params_is_autograd_outside_a_transform_and_func_inside():
    """SAR's first pass and EATA's Fisher run on models whose ops torch.func cannot differentiate (torchvision's
    roi_align): outside a transform they use autograd, inside vmap torch.func.grad; both are the same gradient."""
    params = {"w": torch.tensor([1.0, -2.0]), "b": torch.tensor(0.5)}
    x = torch.tensor([[0.3, 0.7], [1.0, -1.0]])

    def f(p, batch):
        return ((batch @ p["w"] + p["b"]) ** 2).sum(), batch.sum()

    grads, aux = grad_params(f, params, x, has_aux=True)
    expected, _ = torch.func.grad(f, has_aux=True)(params, x)
    assert not in_transform() and float(aux) == float(x.sum())
    for name in params:
        torch.testing.assert_close(grads[name], expected[name])
    batched = torch.func.vmap(lambda b: grad_params(lambda p, z: f(p, z)[0], params, b))(torch.stack([x, 2 * x]))
    torch.testing.assert_close(batched["w"][1], torch.func.grad(lambda p: f(p, 2 * x)[0])(params)["w"])
