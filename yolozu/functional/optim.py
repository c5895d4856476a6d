"""Pure optimisers in the style of optax: a transformation is ``init(params) -> state`` and
``update(grads, state, params) -> (updates, new_state)``; ``chain`` composes, ``apply_updates`` adds.

Nothing is updated in place: every function returns new tensors. Over many small tensors the maths runs on
``torch._foreach_*`` kernels (one launch per op for the whole list); inside ``torch.func`` transforms, which
have no batching rules for foreach ops, the same maths runs tensor by tensor.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import torch
from torch import Tensor

from yolozu.functional.state import Params, foreach_ready


class GradientTransformation(NamedTuple):
    """A pair of pure functions: ``init(params) -> state``, ``update(grads, state, params) -> (updates, state)``."""

    init: Callable[[Params], Any]
    update: Callable[[Params, Any, Params | None], tuple[Params, Any]]


class EmptyState(NamedTuple):
    """State of a stateless transformation."""


class TraceState(NamedTuple):
    """SGD's step count and momentum buffer."""

    count: Tensor
    trace: Params


class PullState(NamedTuple):
    """The parameters a ``pull_to_start`` transformation pulls towards: those its ``init`` saw."""

    start: Params


class ScaleByAdamState(NamedTuple):
    """Adam's step count and first/second moment estimates."""

    count: Tensor
    mu: Params
    nu: Params


def _rebuild(like: Params, values: Sequence[Tensor]) -> Params:
    return dict(zip(like.keys(), values))


def _device(tree: Params) -> torch.device:
    """Where a tree's tensors live (the CPU for an empty tree): counters and norms are made there too."""
    first = next(iter(tree.values()), None)
    return first.device if first is not None else torch.device("cpu")


def _count(params: Params) -> Tensor:
    return torch.zeros((), dtype=torch.int64, device=_device(params))


def global_norm(tree: Params) -> Tensor:
    """The global L2 norm sqrt(sum of squared elements over every tensor), as gradient clipping measures it.

    Args:
      tree: a dict of name -> tensor.
    Returns:
      A 0-d tensor (0 for an empty dict)."""
    leaves = list(tree.values())
    if not leaves:
        return torch.zeros((), device=_device(tree))
    norms = torch._foreach_norm(leaves) if foreach_ready(leaves) else [t.norm() for t in leaves]
    return torch.linalg.vector_norm(torch.stack(norms))


def global_norms(*trees: Params) -> list[Tensor]:
    """``global_norm`` of each tree, from a single foreach launch over all their tensors.

    Args:
      trees: dicts of name -> tensor.
    Returns:
      One 0-d tensor per tree, in order."""
    leaves = [t for tree in trees for t in tree.values()]
    if not foreach_ready(leaves):
        return [global_norm(tree) for tree in trees]
    norms = torch._foreach_norm(leaves)
    out, start = [], 0
    for tree in trees:
        part = norms[start : start + len(tree)]
        out.append(torch.linalg.vector_norm(torch.stack(part)) if part else torch.zeros((), device=_device(tree)))
        start += len(tree)
    return out


def scale(tree: Params, factor: Tensor | float) -> Params:
    """Every tensor multiplied by ``factor`` (a number or a 0-d tensor).

    Args:
      tree: a dict of name -> tensor.
      factor: a number or a 0-d tensor.
    Returns:
      A new dict, keyed like ``tree``."""
    leaves = list(tree.values())
    if foreach_ready(leaves):
        return _rebuild(tree, torch._foreach_mul(leaves, factor))
    return {name: t * factor for name, t in tree.items()}


def apply_updates(params: Params, updates: Params) -> Params:
    """``params + updates`` leaf-wise, as new tensors.

    Args:
      params: the parameters.
      updates: the updates an optimiser returned, keyed like ``params``.
    Returns:
      The new parameters, keyed like ``params``."""
    leaves = list(params.values())
    steps = [updates[name] for name in params]
    if foreach_ready(leaves + steps):
        return _rebuild(params, torch._foreach_add(leaves, steps))
    return {name: p + u for (name, p), u in zip(params.items(), steps)}


def tree_sub(a: Params, b: Params) -> Params:
    """``a - b`` leaf-wise over the names of ``a``.

    Args:
      a: a dict of name -> tensor.
      b: a dict holding at least ``a``'s names, tensors of the same shapes.
    Returns:
      A new dict keyed like ``a``."""
    left = list(a.values())
    right = [b[name] for name in a]
    if foreach_ready(left + right):
        return _rebuild(a, torch._foreach_sub(left, right))
    return {name: x - y for (name, x), y in zip(a.items(), right)}


def _zeros_like(params: Params) -> Params:
    return {name: torch.zeros_like(p) for name, p in params.items()}


def clip_by_global_norm(max_norm: float) -> GradientTransformation:
    """Rescale updates so their global norm is at most ``max_norm`` (Pascanu et al. 2013).

    Args:
      max_norm: the largest global norm let through.
    Returns:
      A stateless ``GradientTransformation``. The decision is a tensor ``clamp`` (no Python branch on a
      tensor value), so it batches under ``vmap``.
    """

    def init_fn(params: Params) -> EmptyState:
        del params
        return EmptyState()

    def update_fn(updates: Params, state: EmptyState, params: Params | None = None) -> tuple[Params, EmptyState]:
        del params
        norm = global_norm(updates)
        factor = torch.where(norm <= max_norm, torch.ones_like(norm), max_norm / norm)
        return scale(updates, factor), state

    return GradientTransformation(init_fn, update_fn)


def sgd(lr: float, momentum: float = 0.0, nesterov: bool = False) -> GradientTransformation:
    """Stochastic gradient descent with heavy-ball or Nesterov momentum, as ``torch.optim.SGD`` computes it.

    buf <- momentum * buf + g (buf <- g at the first step); step = g + momentum * buf (Nesterov) or buf;
    update = -lr * step.

    Args:
      lr: learning rate.
      momentum: momentum coefficient (0 disables the buffer).
      nesterov: Nesterov momentum.
    Returns:
      A ``GradientTransformation`` whose state is a ``TraceState``."""

    def init_fn(params: Params) -> TraceState:
        return TraceState(_count(params), _zeros_like(params))

    def update_fn(grads: Params, state: TraceState, params: Params | None = None):
        del params
        if momentum == 0.0:
            return scale(grads, -lr), TraceState(state.count + 1, state.trace)
        # torch.optim.SGD starts the buffer at the first gradient (buf = g), then buf = m * buf + g.
        keep = momentum * (state.count > 0).to(torch.float32)
        trace = {name: state.trace[name] * keep + g for name, g in grads.items()}
        step = {name: g + momentum * trace[name] for name, g in grads.items()} if nesterov else trace
        return scale(step, -lr), TraceState(state.count + 1, trace)

    return GradientTransformation(init_fn, update_fn)


def adam(lr: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> GradientTransformation:
    """Adam (Kingma & Ba 2015), with the bias corrections in the order ``torch.optim.Adam`` uses.

    mu <- b1 mu + (1 - b1) g;  nu <- b2 nu + (1 - b2) g^2;
    update = -(lr / (1 - b1^t)) * mu / (sqrt(nu) / sqrt(1 - b2^t) + eps).

    Args:
      lr: learning rate.
      b1: decay rate of the first moment.
      b2: decay rate of the second moment.
      eps: added to the denominator.
    Returns:
      A ``GradientTransformation`` whose state is a ``ScaleByAdamState``."""

    def init_fn(params: Params) -> ScaleByAdamState:
        return ScaleByAdamState(_count(params), _zeros_like(params), _zeros_like(params))

    def update_fn(grads: Params, state: ScaleByAdamState, params: Params | None = None):
        del params
        count = state.count + 1
        t = count.to(torch.float64)
        step_size = (-lr / (1.0 - b1**t)).to(torch.float32)
        bc2_sqrt = torch.sqrt(1.0 - b2**t).to(torch.float32)
        g = list(grads.values())
        mu_old = [state.mu[name] for name in grads]
        nu_old = [state.nu[name] for name in grads]
        if foreach_ready(g + mu_old + nu_old):
            mu = torch._foreach_lerp(mu_old, g, 1.0 - b1)
            nu = torch._foreach_mul(nu_old, b2)
            torch._foreach_addcmul_(nu, g, g, value=1.0 - b2)
            denom = torch._foreach_sqrt(nu)
            torch._foreach_div_(denom, bc2_sqrt)
            torch._foreach_add_(denom, eps)
            updates = torch._foreach_div(mu, denom)
            torch._foreach_mul_(updates, step_size)
        else:
            mu = [torch.lerp(m, x, 1.0 - b1) for m, x in zip(mu_old, g)]
            nu = [v * b2 + (1.0 - b2) * x * x for v, x in zip(nu_old, g)]
            updates = [step_size * m / (torch.sqrt(v) / bc2_sqrt + eps) for m, v in zip(mu, nu)]
        return _rebuild(grads, updates), ScaleByAdamState(count, _rebuild(grads, mu), _rebuild(grads, nu))

    return GradientTransformation(init_fn, update_fn)


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Apply transformations in sequence (optax's ``chain``): each one's updates are the next one's input.

    Args:
      transforms: the transformations, first applied first.
    Returns:
      A ``GradientTransformation`` whose state is the tuple of their states."""

    def init_fn(params: Params) -> tuple:
        return tuple(t.init(params) for t in transforms)

    def update_fn(updates: Params, state: tuple, params: Params | None = None):
        new_states = []
        for transform, inner in zip(transforms, state):
            updates, inner = transform.update(updates, inner, params)
            new_states.append(inner)
        return updates, tuple(new_states)

    return GradientTransformation(init_fn, update_fn)


def pull_to_start(rate: float) -> GradientTransformation:
    """Add a pull of the parameters back towards the values ``init`` saw (the source, for a TTT state):
    ``update + rate * (start - params)``. Chained after an optimiser, each step moves the parameters
    ``rate`` of the way back before the optimiser's own move, so on a long stream they stay within about
    ``|optimiser step| / rate`` of the start: the decoupled form (Loshchilov & Hutter's AdamW) of an L2 penalty
    towards the starting weights (L2-SP, Li, Grandvalet & Davoine, ICML 2018).

    Args:
      rate: the fraction of the distance to the start taken back per update, in [0, 1] (0: none).
    Returns:
      A ``GradientTransformation`` whose state is a ``PullState``: the starting parameters themselves, not a
      copy (nothing here updates a tensor in place; a TTT state's ``source`` holds the same tensors).
    Raises:
      ValueError: ``rate`` outside [0, 1]."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"the pull towards the start must be a fraction in [0, 1], got {rate!r}")

    def init_fn(params: Params) -> PullState:
        return PullState(dict(params))

    def update_fn(updates: Params, state: PullState, params: Params | None = None) -> tuple[Params, PullState]:
        if params is None:
            raise ValueError("pull_to_start needs the current parameters: call update(updates, state, params)")
        u = list(updates.values())
        p = [params[name] for name in updates]
        start = [state.start[name] for name in updates]
        if foreach_ready(u + p + start):
            gap = torch._foreach_sub(start, p)
            pulled = torch._foreach_add(u, gap, alpha=rate)
        else:
            pulled = [x + rate * (s - q) for x, s, q in zip(u, start, p)]
        return _rebuild(updates, pulled), state

    return GradientTransformation(init_fn, update_fn)


OPTIMIZERS = ("adam", "sgd")


def build(
    name: str, lr: float, *, momentum: float = 0.9, max_grad_norm: float | None = None, source_pull: float = 0.0
) -> GradientTransformation:
    """The optimiser a config names (one of ``OPTIMIZERS``), behind a global-norm clip when ``max_grad_norm``,
    followed by a pull back towards the starting parameters when ``source_pull`` (``pull_to_start``).

    Args:
      name: ``adam`` or ``sgd``.
      lr: learning rate.
      momentum: SGD's momentum (Adam ignores it).
      max_grad_norm: the clip's largest global norm (None: no clip).
      source_pull: the fraction of the way back to the start taken per update (0: no pull).
    Returns:
      The ``GradientTransformation``."""
    if name == "adam":
        base = adam(lr)
    elif name == "sgd":
        base = sgd(lr, momentum=momentum)
    else:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    clipped = base if max_grad_norm is None else chain(clip_by_global_norm(max_grad_norm), base)
    return clipped if not source_pull else chain(clipped, pull_to_start(source_pull))
