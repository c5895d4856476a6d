"""predictions.json: the schema, validation, the wrapped form with metadata, and crash-safe writing.

A predictions file is a list of ``{"image": str, "detections": [{"class_id": int, "score": float,
"bbox": {"cx", "cy", "w", "h"}}]}`` with scores and boxes in [0, 1], or the wrapped form
``{"schema_version": 1, "predictions": [...], "meta": {...}}``.

Scores are confidences and box fields are normalised to the image, so a value outside [0, 1] (a logit, a pixel
coordinate) is an error naming the entry: evaluated as is it would give a silently wrong mAP. Values within
``ROUNDING`` of the range are accepted (float rounding of a clipped box). A box whose edges pass the image border
while its fields are in range is accepted as COCO does: many detectors do not clip, and pycocotools evaluates
such boxes as they are.
"""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path
from typing import Any, Mapping, Sequence

from yolozu.io.commit import write_outputs

SCHEMA_VERSION = 1
BBOX_KEYS = ("cx", "cy", "w", "h")
ROUNDING = 1e-6
"""How far outside [0, 1] a score or box field may be and still count as in range (float rounding)."""


class PredictionsError(ValueError):
    """Predictions that do not follow the schema; the message names the entry and the field."""


def _is_number(value: Any) -> bool:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def _check_unit(value: float, where: str, what: str) -> None:
    if not -ROUNDING <= value <= 1 + ROUNDING:
        raise PredictionsError(f"{where}: must be in [0, 1] ({what}), got {value!r}")


def _validate_detection(det: Any, where: str) -> None:
    if not isinstance(det, Mapping):
        raise PredictionsError(f"{where}: a detection must be an object, got {type(det).__name__}")
    cls = det.get("class_id")
    if not isinstance(cls, int) or isinstance(cls, bool) or cls < 0:
        raise PredictionsError(f"{where}.class_id: must be a non-negative int, got {cls!r}")
    if not _is_number(det.get("score")):
        raise PredictionsError(f"{where}.score: must be a finite number, got {det.get('score')!r}")
    _check_unit(det["score"], f"{where}.score", "a confidence, not a logit")
    bbox = det.get("bbox")
    if not isinstance(bbox, Mapping):
        raise PredictionsError(f"{where}.bbox: must be an object with keys {', '.join(BBOX_KEYS)}, got {bbox!r}")
    for key in BBOX_KEYS:
        if not _is_number(bbox.get(key)):
            raise PredictionsError(f"{where}.bbox.{key}: must be a finite number, got {bbox.get(key)!r}")
    if bbox["w"] < 0 or bbox["h"] < 0:
        raise PredictionsError(f"{where}.bbox: width and height must be >= 0, got w={bbox['w']}, h={bbox['h']}")
    for key in BBOX_KEYS:
        _check_unit(bbox[key], f"{where}.bbox.{key}", "normalised to the image size, not pixels")


def validate_predictions(preds: Any) -> list[dict]:
    """Check ``preds`` against the schema and return it; raise PredictionsError naming the index and field.

    Args:
      preds: a decoded predictions list.
    Returns:
      ``preds``.
    Raises:
      PredictionsError: naming the index and field."""
    if not isinstance(preds, list):
        raise PredictionsError(f"predictions must be a list of per-image entries, got {type(preds).__name__}")
    for i, entry in enumerate(preds):
        where = f"predictions[{i}]"
        if not isinstance(entry, Mapping):
            raise PredictionsError(f"{where}: must be an object, got {type(entry).__name__}")
        if not isinstance(entry.get("image"), str) or not entry["image"]:
            raise PredictionsError(
                f"{where}.image: must be a non-empty string (the image path), got {entry.get('image')!r}"
            )
        if "\0" in entry["image"]:
            raise PredictionsError(f"{where}.image: a path cannot hold a NUL character, got {entry['image']!r}")
        dets = entry.get("detections")
        if not isinstance(dets, list):
            raise PredictionsError(f"{where}.detections: must be a list, got {type(dets).__name__}")
        for j, det in enumerate(dets):
            _validate_detection(det, f"{where}.detections[{j}]")
    return preds


def check_against_records(
    preds: Any, records: Sequence[Mapping[str, Any]], num_classes: int | None = None
) -> list[dict]:
    """``preds`` as a model's predictions for ``records`` must be: valid (``validate_predictions``), one entry per
    record in the same order with the record's image path, and class ids below ``num_classes`` when given.

    Args:
      preds: what an adapter's ``predict`` returned.
      records: the records it was given.
      num_classes: the model's classes, or None (class ids not bounded above).
    Returns:
      ``preds``, checked.
    Raises:
      PredictionsError: naming the first entry that is not as it must be."""
    validate_predictions(preds)
    if len(preds) != len(records):
        raise PredictionsError(f"{len(preds)} predictions for {len(records)} images: one entry per image is needed")
    for i, (entry, record) in enumerate(zip(preds, records)):
        if entry["image"] != str(record["image"]):
            raise PredictionsError(
                f"predictions[{i}].image is {entry['image']!r}, but image {i} of the run is {str(record['image'])!r}"
            )
        for j, det in enumerate(entry["detections"]):
            if num_classes is not None and det["class_id"] >= num_classes:
                raise PredictionsError(
                    f"predictions[{i}].detections[{j}].class_id: {det['class_id']} is beyond the model's "
                    f"{num_classes} classes"
                )
    return preds


def unwrap(obj: Any) -> list[dict]:
    """The prediction list of a plain list or of the wrapped ``{"schema_version", "predictions", "meta"}`` form.

    Args:
      obj: a decoded predictions document.
    Returns:
      The prediction list.
    Raises:
      PredictionsError: a mapping without ``predictions``, or of another schema version."""
    if isinstance(obj, Mapping):
        if "predictions" not in obj:
            raise PredictionsError(
                f"a wrapped predictions object needs a 'predictions' key; got keys {sorted(obj)[:8]}"
            )
        version = obj.get("schema_version", SCHEMA_VERSION)
        if version != SCHEMA_VERSION:
            raise PredictionsError(f"unsupported schema_version {version!r}; this version reads {SCHEMA_VERSION}")
        return obj["predictions"]
    return obj


MAX_BYTES = 2**31
"""The largest predictions file read (2 GiB: tens of millions of detections)."""


def _read_bounded(path: Path) -> bytes:
    """The bytes of the regular file ``path``, at most ``MAX_BYTES``; a FIFO, a device (/dev/zero) or a folder is
    refused before it is opened, so that nothing waits for a writer or reads without end."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"predictions file not found: {path}") from None
    except OSError as e:
        raise type(e)(f"cannot read the predictions file {path}: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file (a FIFO, a device or a socket)"
        raise PredictionsError(f"the predictions file {path} is {kind}; give a predictions.json file")
    if st.st_size > MAX_BYTES:
        raise PredictionsError(f"the predictions file {path} is {st.st_size} bytes, over the limit of {MAX_BYTES}")
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_BYTES + 1)
    except OSError as e:
        raise type(e)(f"cannot read the predictions file {path}: {e.strerror or e}") from None
    if len(data) > MAX_BYTES:
        raise PredictionsError(f"the predictions file {path} grew over the limit of {MAX_BYTES} bytes while read")
    return data


def load_predictions(path: str | os.PathLike) -> list[dict]:
    """Read and validate a predictions file (plain list or wrapped form); returns the prediction list.

    Anything that is not a valid predictions file (not UTF-8, not JSON, nested too deeply, off the schema) is a
    PredictionsError naming the file; a missing file is FileNotFoundError.

    Args:
      path: the predictions file.
    Returns:
      The validated prediction list.
    Raises:
      PredictionsError: naming the file and what is wrong.
      FileNotFoundError: the file does not exist."""
    path = Path(path)
    data = _read_bounded(path)
    try:
        obj = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise PredictionsError(f"{path} is not UTF-8 text (byte {e.start}); a predictions file is JSON") from None
    except RecursionError:
        raise PredictionsError(f"{path}: JSON nested too deeply to be a predictions file") from None
    except ValueError as e:  # JSONDecodeError, and integers too long to convert
        raise PredictionsError(f"{path} is not valid JSON: {e}") from None
    try:
        return validate_predictions(unwrap(obj))
    except PredictionsError as e:
        raise PredictionsError(f"{path}: {e}") from None


def wrap(predictions: Sequence[Mapping[str, Any]], meta: Mapping[str, Any] | None = None) -> dict:
    """The wrapped form ``{"schema_version", "predictions", "meta"}``.

    Args:
      predictions: the per-image entries.
      meta: what the run records beside them (None: empty).
    Returns:
      The wrapped document."""
    return {"schema_version": SCHEMA_VERSION, "predictions": list(predictions), "meta": dict(meta or {})}


def write_json_atomic(path: str | os.PathLike, obj: Any, *, indent: int | None = None) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically (``yolozu.io.commit.write_outputs`` with one document).

    Readers see either the old file or the complete new one; if anything fails (serialisation included),
    no file is left behind. A missing or unwritable folder is a clear error.

    Args:
      path: the output file.
      obj: a JSON-ready value.
      indent: the indent (None: one line).
    Returns:
      The path written."""
    write_outputs([(path, obj, indent)], create_folders=False)
    return Path(path)
