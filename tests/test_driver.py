"""The guarded driver: keys from (seed, batch, step), rollback by selection, stopped streams, K = 1 and K > 1."""

import torch
from toy import TinyAutoencoder, TinyClassifier, seeded

from yolozu.bridge import make_apply
from yolozu.functional import filters, guards, optim, rng, streams
from yolozu.functional.driver import Carry, make_driver, start
from yolozu.functional.methods.mim import MIMSettings, mim_method
from yolozu.functional.methods.tent import tent_method
from yolozu.functional.step import make_step

NO_LIMITS = guards.GuardLimits()


def _equal_states(a, b) -> bool:
    la, sa = torch.utils._pytree.tree_flatten(a)
    lb, sb = torch.utils._pytree.tree_flatten(b)
    same = (torch.equal(x, y) or torch.allclose(x, y, rtol=0, atol=0, equal_nan=True) for x, y in zip(la, lb))
    return sa == sb and all(same)  # bitwise, NaN equal to NaN (the initial loss before any step)


def _mim(model):
    method = mim_method(make_apply(model), optim.adam(1e-2), MIMSettings(patch_size=4, mask_prob=0.5))
    return method, method.init_state(model, filters.select(model, "all"))


def _images(k, seed=0):
    return torch.rand(k, 2, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_one_stream_equals_steps_with_keys_from_batch_and_step():
    model = seeded(TinyAutoencoder)
    method, source = _mim(model)
    xs = _images(1)
    root = rng.key(5)
    carry, records = make_driver(method, NO_LIMITS)(start(source), xs, [3], 2, root)
    step = make_step(method)
    state = source
    for s in range(2):
        state, metrics = step(state, xs[0], rng.step_key(root, 3, s))
        assert torch.equal(records[s].metrics["loss"][0], metrics["loss"])
    (single,) = streams.unstack_states(carry.state, 1)
    assert _equal_states(single.trainable, state.trainable) and _equal_states(single.buffers, state.buffers)
    assert [r.step for r in records] == [0, 1] and int(carry.stop_code[0]) == 0


def test_a_tripped_step_is_rolled_back_bitwise_and_the_stream_stops():
    model = seeded(TinyClassifier)
    method = tent_method(make_apply(model), optim.sgd(0.5))
    source = method.init_state(model, filters.select(model, "norm_only"))
    limits = guards.GuardLimits(max_total_update_norm=1e-9)
    x = torch.randn(1, 4, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    drive = make_driver(method, limits)
    carry, records = drive(start(source), x, [0], 3, rng.key(0))
    assert len(records) == 1  # the stream stopped at its first step
    assert records[0].verdict.tolist() == [1 + guards.STOP_REASONS.index("max_total_update_norm_exceeded")]
    assert records[0].kept.tolist() == [False] and records[0].taken.tolist() == [True]
    assert _equal_states(carry.state, start(source).state)  # params, buffers, optimiser state, counters
    again, more = drive(carry, x, [1], 2, rng.key(0))
    assert more == [] and again is carry


def test_without_rollback_the_stopped_step_is_kept():
    model = seeded(TinyClassifier)
    method = tent_method(make_apply(model), optim.sgd(0.5))
    source = method.init_state(model, filters.select(model, "norm_only"))
    x = torch.randn(1, 4, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    limits = guards.GuardLimits(max_total_update_norm=1e-9)
    carry, records = make_driver(method, limits, rollback=False)(start(source), x, [0], 3, rng.key(0))
    assert len(records) == 1 and records[0].kept.tolist() == [True]
    assert int(carry.state.step[0]) == 1 and int(carry.stop_code[0]) != 0


def test_k_streams_equal_k_single_drives_with_one_stream_stopped():
    model = seeded(TinyClassifier)
    method = tent_method(make_apply(model), optim.sgd(0.5))
    source = method.init_state(model, filters.select(model, "norm_only"))
    xs = torch.randn(3, 4, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    xs[1] = float("nan")  # stream 1 trips the non-finite guard at its first step
    drive = make_driver(method, NO_LIMITS)
    carry, records = drive(start(source, 3), xs, [0, 1, 2], 2, rng.key(0))
    assert records[0].kept.tolist() == [True, False, True]
    assert records[1].taken.tolist() == [True, False, True]
    assert carry.stop_code.tolist()[1] == 1 + guards.STOP_REASONS.index("non_finite_metrics")
    for k, streamed in enumerate(streams.unstack_states(carry.state, 3)):
        alone, _ = drive(start(source), xs[k : k + 1], [k], 2, rng.key(0))
        (single,) = streams.unstack_states(alone.state, 1)
        for name in single.trainable:
            torch.testing.assert_close(streamed.trainable[name], single.trainable[name], rtol=1e-5, atol=1e-6)
    (stopped,) = streams.unstack_states(streams.stack_states([streams.unstack_states(carry.state, 3)[1]]), 1)
    assert _equal_states(stopped.trainable, source.trainable)


def test_a_stopped_carry_is_a_plain_value():
    model = seeded(TinyClassifier)
    method = tent_method(make_apply(model), optim.adam(1e-3))
    carry = start(method.init_state(model, filters.select(model, "norm_only")), 2)
    assert isinstance(carry, Carry) and carry.stop_code.tolist() == [0, 0]
    assert carry.state.trainable["bn1.weight"].shape[0] == 2
