"""``TorchvisionAdapter``: a torchvision detector (Faster R-CNN, RetinaNet, FCOS, SSD) behind ``ModelAdapter``.

``predict`` is the model's own eval forward and post-processing; boxes become normalised (cx, cy, w, h) and
class ids the model's labels with the background removed: label - 1 for Faster R-CNN and SSD (whose label 0 is
background), the label itself for RetinaNet and FCOS (which have no background class). For test-time training
its frozen norms become adaptable (``norms.make_adaptable``, the same outputs bitwise) and ``get_model()`` is
a ``DetectorView`` whose outputs the family's readout reads: softmax over the box head's classes for Faster
R-CNN and SSD, independent sigmoids per anchor or location for RetinaNet and FCOS.
"""

from __future__ import annotations

import os
from typing import Any, Iterator, Mapping, Sequence

import attrs
import torch
from torch import Tensor, nn

from yolozu.adapter import ModelAdapter, Prediction, Record
from yolozu.adapters.detector import load_image, to_tensor
from yolozu.adapters.norms import make_adaptable
from yolozu.adapters.tv_forward import DEFAULT_TOPK, DetectorView
from yolozu.adapters.tv_models import build_detector, declare_inline_norms, family_of_model
from yolozu.functional.readout import Readout
from yolozu.io.feature_stats import load_tensors, stats_path_for

BACKGROUND = {"two_stage": 1, "ssd": 1, "retinanet": 0, "fcos": 0}
"""How many leading labels of each family are background (removed from the class ids)."""
NO_RECONSTRUCTION = "this model has no reconstruction head; use tent/cotta (or eata/sar) or give a recon_fn"


def view_samples(output: Mapping[str, Any]) -> Tensor:
    """Class logits at each image's top-k candidates (``DetectorView``'s ``samples``)."""
    return output["samples"]


def view_scores(output: Mapping[str, Any]) -> Tensor:
    """Class logits at the candidates fixed by the image size (``DetectorView``'s ``scores``)."""
    return output["scores"]


def view_flip_back(output: Mapping[str, Any]) -> Tensor:
    """``scores`` of the flipped image, permuted into the original frame."""
    return output["scores"][..., output["flip_index"]]


def no_reconstruction(output: Any) -> Tensor:
    """MIM's reconstruction of a model that has none: a ValueError saying what to use instead."""
    del output
    raise ValueError(NO_RECONSTRUCTION)


def family_readout(family: str) -> Readout:
    """How TTT reads a ``DetectorView`` of ``family``: sigmoid scores for RetinaNet and FCOS, else softmax."""
    kind = "sigmoid" if family in ("retinanet", "fcos") else "softmax"
    return Readout(
        scores=view_scores,
        score_kind=kind,
        samples=view_samples,
        sample_kind=kind,
        flip_back=view_flip_back,
        recon=no_reconstruction,
        no_object=0,  # Faster R-CNN's and SSD's background label; sigmoid families have none
    )


def _box(box: list[float], h: int, w: int) -> dict[str, float]:
    x1, y1, x2, y2 = box
    return {"cx": (x1 + x2) / 2 / w, "cy": (y1 + y2) / 2 / h, "w": (x2 - x1) / w, "h": (y2 - y1) / h}


def to_predictions(
    detections: Sequence[Mapping[str, Tensor]], records: Sequence[Record], size: tuple[int, int], offset: int
) -> list[Prediction]:
    """torchvision detections (boxes x1, y1, x2, y2 in the input's pixels) -> one prediction per record."""
    if len(detections) != len(records):
        raise ValueError(f"got detections for {len(detections)} images but {len(records)} records")
    h, w = size
    out = []
    for record, found in zip(records, detections):
        rows = zip(found["boxes"].tolist(), found["scores"].tolist(), found["labels"].tolist())
        dets = [{"class_id": int(c) - offset, "score": float(s), "bbox": _box(b, h, w)} for b, s, c in rows]
        out.append({"image": str(record["image"]), "detections": dets})
    return out


class TorchvisionAdapter(ModelAdapter):
    """Adapter for a torchvision detector instance ``model`` (converted in place: its ``FrozenBatchNorm2d``
    layers become ``AdaptableBatchNorm2d``). ``from_checkpoint`` builds one by name.

    Args:
      model: a ``FasterRCNN``, ``RetinaNet``, ``FCOS`` or ``SSD`` from ``torchvision.models.detection``.
      device: where it runs. batch_size: images per forward pass in ``predict``.
      image_size: resize every image to this square side first; None: images as they are (one batch, one size).
      topk: candidates per image whose class distributions Tent, EATA and SAR read.
      name, checkpoint: recorded in ``describe()``.
      align_layers: layers of ``get_model()`` (``detector.*`` names) whose features ``--ttt-method align``
        matches, with the statistics saved beside ``checkpoint`` (``tools/source_stats.py``); none by default.
    """

    name = "torchvision"

    def __init__(
        self,
        model: nn.Module,
        *,
        device: str | torch.device = "cpu",
        batch_size: int = 8,
        image_size: int | None = None,
        topk: int = DEFAULT_TOPK,
        name: str | None = None,
        checkpoint: str | os.PathLike | None = None,
        align_layers: Sequence[str] = (),
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if image_size is not None and image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        self.family = family_of_model(model)
        self.converted = make_adaptable(model)
        declare_inline_norms(model)
        self.device = torch.device(device)
        self.detector = model.to(self.device).eval()
        self.view = DetectorView(self.detector, self.family, topk)
        self.batch_size = batch_size
        self.image_size = image_size
        self.model_name = name or type(model).__name__
        self.checkpoint = checkpoint
        self.align_layers = tuple(align_layers)

    @classmethod
    def from_checkpoint(
        cls,
        name: str,
        checkpoint: str | os.PathLike,
        *,
        num_classes: int | None = None,
        frozen_bn_eps: float | None = None,
        model_kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> "TorchvisionAdapter":
        """The adapter of ``torchvision.models.detection.NAME`` with the checkpoint's weights (``tv_models.
        build_detector``; ``model_kwargs`` go to the builder); ``options`` are ``__init__``'s."""
        model = build_detector(
            name, checkpoint, num_classes=num_classes, frozen_bn_eps=frozen_bn_eps, **dict(model_kwargs or {})
        )
        return cls(model, name=name, checkpoint=checkpoint, **options)

    @property
    def class_offset(self) -> int:
        """Labels below this are background; class id = label - class_offset."""
        return BACKGROUND[self.family]

    @property
    def num_classes(self) -> int:
        """Classes the detector predicts, background removed; a label class id must be below this."""
        head = self.detector.roi_heads.box_predictor.cls_score.out_features if self.family == "two_stage" else None
        if head is None:
            scoring = self.detector.head.classification_head
            head = getattr(scoring, "num_classes", None) or scoring.num_columns
        return int(head) - self.class_offset

    def get_model(self) -> nn.Module:
        """The ``DetectorView`` TTT adapts (its tensors are the detector's, named ``detector.*``)."""
        return self.view

    def load_batch(self, records: Sequence[Record]) -> Tensor:
        """Input tensor ``(B, 3, H, W)`` in [0, 1] on the adapter's device; images of one batch share a size."""
        if not records:
            raise ValueError("load_batch needs at least one record")
        images = [load_image(record["image"], self.image_size) for record in records]
        shapes = {image.shape for image in images}
        if len(shapes) > 1:
            found = ", ".join(f"{r['image']} {i.shape[1]}x{i.shape[0]}" for r, i in zip(records, images))
            raise ValueError(
                f"images of one batch differ in size ({found}); give the adapter image_size=S "
                "(--image-size S) to resize every image to S x S"
            )
        return to_tensor(images).to(self.device)

    def build_loader(self, records: Sequence[Record], *, batch_size: int) -> Iterator[Tensor]:
        """Preprocessed batches of ``records`` in order (the last one may be smaller); deterministic."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        for start in range(0, len(records), batch_size):
            yield self.load_batch(records[start : start + batch_size])

    def decode(self, output: Mapping[str, Any], records: Sequence[Record]) -> list[Prediction]:
        """A ``DetectorView`` output for ``records`` (same order) -> one prediction per record."""
        return to_predictions(output["detections"], records, output["input_size"], self.class_offset)

    def predict(self, records: Sequence[Record]) -> list[Prediction]:
        """The model's own eval forward and post-processing for ``records``, in order, without gradients."""
        was_training = self.detector.training
        self.detector.eval()
        out: list[Prediction] = []
        try:
            with torch.no_grad():
                for start in range(0, len(records), self.batch_size):
                    chunk = records[start : start + self.batch_size]
                    x = self.load_batch(chunk)
                    size = (int(x.shape[-2]), int(x.shape[-1]))
                    out.extend(to_predictions(self.detector(list(x)), chunk, size, self.class_offset))
        finally:
            self.detector.train(was_training)
        return out

    def ttt_readout(self) -> Readout:
        """The family's readout (``family_readout``) with the layers feature alignment matches and the source
        statistics found beside the checkpoint, when there are some."""
        stats = stats_path_for(self.checkpoint) if self.checkpoint is not None else None
        found = load_tensors(stats) if stats is not None and stats.is_file() else None
        return attrs.evolve(family_readout(self.family), layers=self.align_layers, source_stats=found)

    def describe(self) -> dict[str, Any]:
        """Settings worth recording in predictions metadata."""
        return {
            "adapter": self.name,
            "model": self.model_name,
            "family": self.family,
            "checkpoint": None if self.checkpoint is None else str(self.checkpoint),
            "num_classes": self.num_classes,
            "class_offset": self.class_offset,
            "image_size": self.image_size,
            "topk": self.view.topk,
            "frozen_norms_made_adaptable": len(self.converted),
        }
