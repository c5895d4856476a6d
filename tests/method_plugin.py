"""A TTT method the package does not ship, written as a user would in a module of their own: entropy of
temperature-scaled class scores. tests/test_method_registry.py registers it through the entry-point group
``yolozu.methods`` and runs it through ``yolozu export`` in every schedule."""

import attrs
import torch

from yolozu.functional.losses import softmax_entropy
from yolozu.functional.methods import MethodEntry
from yolozu.functional.settings import number, setting
from yolozu.functional.step import LossOutput, Method


@attrs.frozen(kw_only=True)
class SharpSettings:
    temperature: float = setting(2.0, "sharp: softmax temperature", number(0, low_open=True))


def sharp_method(apply, optimizer, settings=SharpSettings(), *, readout, bn="running") -> Method:
    """Entropy of the readout's class scores divided by ``settings.temperature``."""

    def loss_fn(params, buffers, batch, extra):
        output, new_buffers = apply(params, buffers, batch, bn_mode=bn)
        loss = softmax_entropy(readout.scores(output) / settings.temperature, dim=1).mean()
        return loss, LossOutput(new_buffers, {"temperature": torch.full_like(loss, settings.temperature)}, output)

    return Method(loss_fn, optimizer, metric_names=("temperature",), row_fields={"kind": "sharp"})


ENTRY = MethodEntry(sharp_method, SharpSettings, "sharp_")
