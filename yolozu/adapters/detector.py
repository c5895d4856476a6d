"""``DetectorAdapter``: the built-in CenterNet-style detector behind the ``ModelAdapter`` contract.

The pieces are separate so the export flow can run the model itself (e.g. with adapted tensors through
``torch.func.functional_call``): ``load_batch`` (records -> input tensor), the model (``get_model``), and
``decode`` (outputs -> predictions). ``predict`` is those three in a row.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from yolozu.adapter import ModelAdapter, Prediction, Record
from yolozu.adapters.images import ImageLoadError, image_batches
from yolozu.functional.readout import Readout, peak_class_logits
from yolozu.io.feature_stats import load_tensors, stats_path_for
from yolozu.models.checkpoint import DEFAULT_CHECKPOINT, load_detector
from yolozu.models.decode import decode as decode_outputs

TENT_LOSSES = ("peak_softmax", "sigmoid")
"""How Tent reads the detector (``tent_loss``): ``peak_softmax``, the softmax over the classes at each image's
top-k heatmap peaks ("which digit is this object"); ``sigmoid``, every heatmap score as an independent
Bernoulli (mostly confident background)."""
DEFAULT_PEAKS = 4
ALIGN_LAYERS = ("stage2", "stage3", "stage4", "smooth2", "smooth1")
"""The layers whose features feature alignment matches (``--ttt-method align``): the backbone's last three stages
and the neck at strides 8 and 4 (``smooth1`` is the heads' input), each a conv-BatchNorm-ReLU block's output.
Chosen on the held-out corruptions (docs/benchmark-notes.md): the heads' input added to the first four gained on
the held-out streams of both data seeds and online; the stem and ``stage1`` did not."""


def heatmap_logits(output: Mapping[str, Tensor]) -> Tensor:
    """The class heatmap logits ``(B, C, H, W)`` (CoTTA's scores)."""
    return output["logits"]


def heatmap_peaks(output: Mapping[str, Tensor], k: int = DEFAULT_PEAKS) -> Tensor:
    """The class logits ``(B, C, k)`` at each image's top-k heatmap peaks (Tent's samples)."""
    return peak_class_logits(heatmap_logits(output), k)


def reconstruction(output: Mapping[str, Tensor]) -> Tensor:
    """The MIM reconstruction ``(B, 3, S, S)`` (present when the forward ran with ``recon=True``)."""
    return output["recon"]


SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
"""Pillow's modes of a 16-bit greyscale PNG (``convert("RGB")`` would clip each value to 255: a white image)."""


def _check_pixels(im: Image.Image, path: str | Path) -> None:
    """Refuse an image whose header announces more pixels than Pillow's ``MAX_IMAGE_PIXELS`` (a decompression
    bomb: a small file that decodes to gigabytes)."""
    width, height = im.size
    if Image.MAX_IMAGE_PIXELS is not None and width * height > Image.MAX_IMAGE_PIXELS:
        raise ImageLoadError(
            f"refusing image {path}: {width} x {height} pixels is over the limit of {Image.MAX_IMAGE_PIXELS} "
            "(a decompression bomb?); resize it first"
        )


def _rgb(im: Image.Image, path: str | Path) -> Image.Image:
    """``im`` as 8-bit RGB at its true bit depth: a 16-bit greyscale image is scaled from [0, 65535] to [0, 255]
    (rounded), not clipped."""
    if im.mode not in SIXTEEN_BIT_MODES:
        return im.convert("RGB")
    values = np.asarray(im, dtype=np.float64)
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise ImageLoadError(f"cannot read image {path}: {im.mode} values outside [0, 65535] (not a 16-bit image)")
    grey = np.rint(values * (255.0 / 65535.0)).astype(np.uint8)
    return Image.fromarray(grey, mode="L").convert("RGB")


def load_image(path: str | Path, size: int | None) -> np.ndarray:
    """One image as RGB uint8 ``(size, size, 3)``, resized bilinearly when its size differs (None: as it is); a
    16-bit image is scaled to 8 bits (``_rgb``), an image of more than ``Image.MAX_IMAGE_PIXELS`` is refused."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the limit is checked below
            with Image.open(path) as im:
                _check_pixels(im, path)
                im = _rgb(im, path)
                if size is not None and im.size != (size, size):
                    im = im.resize((size, size), Image.BILINEAR)
                return np.asarray(im, dtype=np.uint8)
    except FileNotFoundError:
        raise ImageLoadError(f"image not found: {path}") from None
    except Image.DecompressionBombError:
        raise ImageLoadError(
            f"refusing image {path}: over Pillow's limit of {Image.MAX_IMAGE_PIXELS} pixels (a decompression bomb?); "
            "resize it first"
        ) from None
    except ImageLoadError:
        raise
    except OSError as e:
        raise ImageLoadError(f"cannot read image {path}: {e}") from None


def to_tensor(images: Sequence[np.ndarray]) -> Tensor:
    """uint8 ``(H, W, 3)`` images -> float ``(B, 3, H, W)`` in [0, 1]."""
    batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
    return batch.to(torch.float32).div_(255.0).contiguous()


class DetectorAdapter(ModelAdapter):
    """Adapter for :class:`yolozu.models.CenterNetDetector` checkpoints.

    Args:
      checkpoint: path of a detector checkpoint; None loads the committed default.
      device: where the model runs.
      batch_size: images per forward pass in ``predict``.
      score_threshold, max_detections, nms_iou: decoding (see :func:`yolozu.models.decode`).
      tent_loss: ``"peak_softmax"`` (softmax entropy over the classes at the top-k heatmap peaks, default)
        or ``"sigmoid"`` (mean binary entropy of all heatmap scores).
      tent_peaks: k for ``"peak_softmax"``.
      workers: image-loading processes of ``build_loader`` and ``predict`` (0: in this process).
    """

    name = "detector"

    def __init__(
        self,
        checkpoint: str | Path | None = None,
        *,
        device: str | torch.device = "cpu",
        batch_size: int = 32,
        score_threshold: float = 0.01,
        max_detections: int = 100,
        nms_iou: float = 0.5,
        tent_loss: str = "peak_softmax",
        tent_peaks: int = DEFAULT_PEAKS,
        workers: int = 0,
    ) -> None:
        if tent_loss not in TENT_LOSSES:
            raise ValueError(f"unknown tent_loss {tent_loss!r}; choose one of {', '.join(TENT_LOSSES)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.model = load_detector(checkpoint, device=self.device)
        self.checkpoint = checkpoint
        self.batch_size = batch_size
        self.score_threshold = score_threshold
        self.max_detections = max_detections
        self.nms_iou = nms_iou
        self.tent_loss = tent_loss
        self.tent_peaks = tent_peaks
        self.workers = workers

    @property
    def image_size(self) -> int:
        """Side of the square model input, in pixels."""
        return int(self.model.image_size)

    @property
    def num_classes(self) -> int:
        """Classes the detector predicts; a label class id must be below this."""
        return int(self.model.num_classes)

    def get_model(self) -> nn.Module:
        """The detector module (TTT adapts its tensors)."""
        return self.model

    def load_batch(self, records: Sequence[Record]) -> Tensor:
        """Input tensor ``(B, 3, S, S)`` in [0, 1] on the adapter's device; a bad image raises ImageLoadError."""
        if not records:
            raise ValueError("load_batch needs at least one record")
        images = [load_image(record["image"], self.image_size) for record in records]
        return to_tensor(images).to(self.device)

    def build_loader(self, records: Sequence[Record], *, batch_size: int) -> Iterator[Tensor]:
        """Preprocessed batches of ``records`` in order (the last one may be smaller), read by ``workers``
        processes; the same tensors as ``load_batch`` of the same records."""
        load = functools.partial(load_image, size=self.image_size)
        paths = [str(record["image"]) for record in records]
        return image_batches(paths, load, to_tensor, batch_size=batch_size, workers=self.workers, device=self.device)

    def decode(self, output: Mapping[str, Tensor], records: Sequence[Record]) -> list[Prediction]:
        """Model outputs for ``records`` (same order) -> one prediction per record."""
        detections = decode_outputs(
            output,
            score_threshold=self.score_threshold,
            max_detections=self.max_detections,
            nms_iou=self.nms_iou,
        )
        if len(detections) != len(records):
            raise ValueError(f"decode got outputs for {len(detections)} images but {len(records)} records")
        return [{"image": str(record["image"]), "detections": dets} for record, dets in zip(records, detections)]

    def predict(self, records: Sequence[Record]) -> list[Prediction]:
        """Predictions for ``records`` in order, with the model in eval mode and no gradients."""
        was_training = self.model.training
        self.model.eval()
        out: list[Prediction] = []
        try:
            with torch.no_grad():
                batches = self.build_loader(records, batch_size=self.batch_size)
                for start, x in zip(range(0, len(records), self.batch_size), batches):
                    out.extend(self.decode(self.model(x), records[start : start + self.batch_size]))
        finally:
            self.model.train(was_training)
        return out

    def ttt_readout(self) -> Readout:
        """How TTT reads this detector: sigmoid heatmap scores (dense, flipped with the image), Tent's samples
        (``tent_loss``), the MIM reconstruction, and the layers feature alignment matches with the source
        statistics saved beside the checkpoint (``tools/source_stats.py``), when there are some."""
        peaks = self.tent_loss == "peak_softmax"
        stats = stats_path_for(self.checkpoint if self.checkpoint is not None else DEFAULT_CHECKPOINT)
        return Readout(
            samples=functools.partial(heatmap_peaks, k=self.tent_peaks) if peaks else None,
            sample_kind="softmax" if peaks else None,
            recon_kwargs={"recon": True},
            recon=reconstruction,
            scores=heatmap_logits,
            score_kind="sigmoid",
            spatial=True,
            layers=ALIGN_LAYERS,
            source_stats=load_tensors(stats) if stats.is_file() else None,
        )

    def describe(self) -> dict[str, Any]:
        """Settings worth recording in predictions metadata."""
        return {
            "adapter": self.name,
            "checkpoint": str(self.checkpoint) if self.checkpoint is not None else "default",
            "image_size": self.image_size,
            "score_threshold": self.score_threshold,
            "max_detections": self.max_detections,
            "nms_iou": self.nms_iou,
            "tent_loss": self.tent_loss,
        }
