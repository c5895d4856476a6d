"""Batches of decoded images from a ``torch.utils.data.DataLoader``: image reading off the main process.

The export is bound by image loading long before the model on a GPU; ``workers`` processes decode images while
the main one runs the model. Batches keep the records' order, and a batch's tensor is the same whatever the
number of workers, so predictions are too. A bad image raises ``ImageLoadError`` in the main process with its
own message (the worker hands the error back rather than a traceback).
"""

from __future__ import annotations

import errno
import functools
import os
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

try:  # imported here: once the process is out of file descriptors no module can be imported
    import resource
except ImportError:  # not POSIX
    resource = None  # type: ignore[assignment]


class ImageLoadError(OSError):
    """An input image that is missing or cannot be decoded."""


def default_workers() -> int:
    """Loader processes when none are asked for: half the CPUs, at most 4 (0 on a one-CPU machine)."""
    return min(4, (os.cpu_count() or 1) // 2)


class _Images(Dataset):
    def __init__(self, paths: Sequence[str], load: Callable[[str], np.ndarray]) -> None:
        self.paths = list(paths)
        self.load = load

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> np.ndarray | ImageLoadError:
        try:
            return self.load(self.paths[index])
        except ImageLoadError as e:  # handed back whole: a worker's own exception would carry its traceback
            return e


def _collate(images: list, to_tensor: Callable[[list[np.ndarray]], Tensor]) -> Tensor | ImageLoadError:
    """The batch tensor, or the first image's load error (raised by the main process, not the worker)."""
    failed = next((image for image in images if isinstance(image, ImageLoadError)), None)
    return failed if failed is not None else to_tensor(images)


def image_batches(
    paths: Sequence[str],
    load: Callable[[str], np.ndarray],
    to_tensor: Callable[[list[np.ndarray]], Tensor],
    *,
    batch_size: int,
    workers: int,
    device: torch.device,
) -> Iterator[Tensor]:
    """``to_tensor`` of consecutive ``batch_size`` images of ``paths`` (``load`` decodes one), on ``device``;
    ``workers`` loader processes (0: in this process), pinned memory and non-blocking copies on CUDA."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    images = _Images(paths, load)
    collate = functools.partial(_collate, to_tensor=to_tensor)
    if workers == 0 or len(images) <= batch_size:  # one batch: a worker process would only add its start-up
        batches: Iterable = (
            collate([images[i] for i in range(start, min(start + batch_size, len(images)))])
            for start in range(0, len(images), batch_size)
        )
    else:
        batches = DataLoader(
            images, batch_size=batch_size, num_workers=workers, collate_fn=collate, pin_memory=device.type == "cuda"
        )
    try:
        for batch in batches:
            if isinstance(batch, ImageLoadError):
                raise batch
            yield batch.to(device, non_blocking=True)
    except (OSError, RuntimeError) as e:
        if isinstance(e, ImageLoadError) or not _out_of_files(e):
            raise
        error = OSError(
            f"too many open files while {workers} image-loading processes ran (the limit, ulimit -n, is "
            f"{_file_limit()}); raise it or pass --workers 0"
        )
        error.errno = errno.EMFILE
        raise error from None


def _out_of_files(error: BaseException) -> bool:
    """Whether ``error`` is the process running out of file descriptors (torch's loader words it its own way)."""
    return getattr(error, "errno", None) == errno.EMFILE or "Too many open files" in str(error)


def _file_limit() -> str:
    if resource is None:
        return "unknown"
    return str(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
