import pytest
import torch

from yolozu.functional import rng


def test_keys_are_pure_and_children_distinct():
    k = rng.key(7)
    assert rng.key(7) == k
    children = rng.split(k, 4)
    folded = [rng.fold_in(k, i) for i in range(4)]
    assert len(set(children) | set(folded) | {k}) == 9
    assert rng.split(k, 4) == children


def test_generator_streams_follow_keys():
    a = torch.rand(5, generator=rng.generator(rng.key(1)))
    b = torch.rand(5, generator=rng.generator(rng.key(1)))
    c = torch.rand(5, generator=rng.generator(rng.key(2)))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_bad_seed_and_split_are_errors():
    with pytest.raises(TypeError):
        rng.key(1.5)
    with pytest.raises(ValueError):
        rng.split(rng.key(0), 0)
