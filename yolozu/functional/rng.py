"""Explicit random keys, JAX style: ``key(seed)``, ``split(key, n)``, ``fold_in(key, data)``.

A key is an immutable 64-bit value; deriving children is a pure hash (SplitMix64's finaliser), so the same
key always gives the same stream, whatever else the program sampled before. Samplers that need torch's RNG
get a ``torch.Generator`` seeded from the key with ``generator(key)``.
"""

from __future__ import annotations

import attrs
import torch

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_SPLIT_DOMAIN = 0x5EED5EED5EED5EED


def _mix64(x: int) -> int:
    """SplitMix64 finaliser (Steele, Lea & Flood 2014): a bijective avalanche on 64-bit integers."""
    x = (x + _GOLDEN) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


@attrs.frozen
class Key:
    """A random key: 64 bits of state that samplers consume and never change."""

    value: int = attrs.field(converter=lambda v: int(v) & _MASK64)


def key(seed: int) -> Key:
    """The root key of a seed (a splitmix64 mix of it), from which every random draw of a run folds in.

    Args:
      seed: an int.
    Returns:
      The ``Key``.
    Raises:
      TypeError: ``seed`` is not an int."""
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    return Key(_mix64(seed & _MASK64))


def fold_in(k: Key, data: int) -> Key:
    """A new key that depends on ``k`` and the integer ``data`` (a step, a batch index, a stream id).

    Args:
      k: the parent key.
      data: any int.
    Returns:
      The child ``Key``."""
    return Key(_mix64(k.value ^ _mix64(int(data) & _MASK64)))


def split(k: Key, n: int = 2) -> tuple[Key, ...]:
    """``n`` independent child keys of ``k``, distinct from any ``fold_in(k, i)``.

    Args:
      k: the parent key.
      n: how many children (at least 1).
    Returns:
      ``n`` keys."""
    if n < 1:
        raise ValueError(f"split needs n >= 1, got {n}")
    base = Key(_mix64(k.value ^ _SPLIT_DOMAIN))
    return tuple(fold_in(base, i) for i in range(n))


def generator(k: Key, device: torch.device | str | None = None) -> torch.Generator:
    """A ``torch.Generator`` on ``device`` (default CPU) seeded from ``k``.

    CPU and CUDA generators produce different streams from the same seed; samplers that must agree across
    devices (``masking.block_mask``) draw on the CPU and move the (small) result.

    Args:
      k: the key.
      device: the generator's device.
    Returns:
      A seeded ``torch.Generator``."""
    g = torch.Generator(device=device if device is not None else "cpu")
    g.manual_seed(k.value)
    return g


def step_key(root: Key, batch: int, step: int) -> Key:
    """The key of step ``step`` on batch ``batch`` (a batch of a stream, or an image of an episodic run): the
    same wherever and however that batch is adapted, one stream or K at once.

    Args:
      root: the run's root key.
      batch: the batch's index in the whole run.
      step: the step's index on that batch.
    Returns:
      The step's ``Key``."""
    return fold_in(fold_in(root, batch), step)
