"""Small models and adapters shared by the tests: each has BatchNorm, a LoRA branch and an adapter module,
so every update filter selects something."""

from __future__ import annotations

import torch
from torch import nn

from yolozu.adapter import ModelAdapter


class LowRank(nn.Module):
    """A zero-initialised low-rank 1x1 conv branch."""

    def __init__(self, channels: int, rank: int = 2) -> None:
        super().__init__()
        self.down = nn.Conv2d(channels, rank, 1, bias=False)
        self.up = nn.Conv2d(rank, channels, 1, bias=False)
        nn.init.zeros_(self.up.weight)

    def forward(self, x):
        return self.up(self.down(x))


class TinyClassifier(nn.Module):
    def __init__(self, classes: int = 5, width: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(width)
        self.lora = LowRank(width)
        self.adapter = nn.Linear(width, width)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        h = self.conv2(h)
        h = torch.relu(self.bn2(h + self.lora(h)))
        h = h.mean(dim=(2, 3))
        return self.head(h + self.adapter(h))


class TinyAutoencoder(nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.enc = nn.Conv2d(3, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.mid = nn.Conv2d(width, width, 3, padding=1)
        self.lora = LowRank(width)
        self.dec = nn.Conv2d(width, 3, 3, padding=1)

    def forward(self, x):
        h = torch.relu(self.bn(self.enc(x)))
        h = torch.relu(self.mid(h) + self.lora(h))
        return torch.sigmoid(self.dec(h))


def seeded(factory, seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return factory(**kwargs)


class TensorAdapter(ModelAdapter):
    """An adapter over a module whose 'records' are input tensors; build_loader batches them in order."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def predict(self, records):
        return [{"image": str(i), "detections": []} for i, _ in enumerate(records)]

    def get_model(self) -> nn.Module:
        return self.model

    def build_loader(self, records, *, batch_size):
        tensors = list(records)
        for start in range(0, len(tensors), batch_size):
            yield torch.stack(tensors[start : start + batch_size])


def snapshot(model: nn.Module) -> dict:
    """Bitwise copies of every parameter and buffer."""
    return {name: t.detach().clone() for name, t in list(model.named_parameters()) + list(model.named_buffers())}


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class TinyHeatmap(nn.Module):
    """A dense detector in miniature: class maps ``(B, classes, H, W)`` scored by independent sigmoids."""

    def __init__(self, classes: int = 3, width: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.lora = LowRank(width)
        self.head = nn.Conv2d(width, classes, 3, padding=1)

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        return self.head(h + self.lora(h))


UNGUARDED = (
    "--ttt-max-grad-norm", "none", "--ttt-max-update-norm", "none", "--ttt-max-total-update-norm", "none",
    "--ttt-max-loss-ratio", "none",
)  # fmt: skip
"""Export flags that keep a plain ``--ttt`` with customised core settings unguarded: YOLOZU's preset rule fills
the guards a flag leaves unset, and ``none`` is a set value."""
