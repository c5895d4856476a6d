"""DetectorAdapter with the committed checkpoint on rendered images; build_adapter; the Tent readout."""

from __future__ import annotations

import functools
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from yolozu.adapter import DummyAdapter
from yolozu.adapters import build_adapter
from yolozu.adapters.detector import DetectorAdapter, ImageLoadError
from yolozu.functional.methods.tent import tent_loss
from yolozu.functional.readout import Readout, gather_positions, peak_indices
from yolozu.io.predictions import validate_predictions


@pytest.fixture(scope="module")
def adapter() -> DetectorAdapter:
    return DetectorAdapter(batch_size=2)


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> list[dict]:
    from yolozu.demo.synth import SynthSpec, render_sample

    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    out = []
    for i in range(3):
        img, labels = render_sample(rng, SynthSpec(), "val")
        path = folder / f"{i}.png"
        Image.fromarray(img).save(path)
        out.append({"image": str(path), "labels": labels})
    return out


def test_predictions_follow_the_schema_in_record_order(adapter, records):
    preds = adapter.predict(records)
    validate_predictions(preds)
    assert [p["image"] for p in preds] == [r["image"] for r in records]
    assert all(len(p["detections"]) <= adapter.max_detections for p in preds)
    # the trained detector finds the digits: each labelled object has a same-class detection nearby
    for pred, record in zip(preds, records):
        for obj in record["labels"]:
            near = [
                d
                for d in pred["detections"]
                if d["class_id"] == obj["class_id"]
                and d["score"] > 0.2
                and abs(d["bbox"]["cx"] - obj["cx"]) < 0.05
                and abs(d["bbox"]["cy"] - obj["cy"]) < 0.05
            ]
            assert near, (record["image"], obj)


def test_predict_is_deterministic_and_batch_size_independent(records):
    a = DetectorAdapter(batch_size=1).predict(records)
    b = DetectorAdapter(batch_size=3).predict(records)
    assert [len(p["detections"]) for p in a] == [len(p["detections"]) for p in b]
    for pa, pb in zip(a, b):
        for da, db in zip(pa["detections"], pb["detections"]):
            assert da["class_id"] == db["class_id"]
            assert da["score"] == pytest.approx(db["score"], abs=1e-5)


def test_missing_image_error_names_the_file(adapter, records, tmp_path):
    missing = str(tmp_path / "not-there.png")
    with pytest.raises(ImageLoadError, match="not-there.png"):
        adapter.predict([records[0], {"image": missing, "labels": []}])
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    with pytest.raises(ImageLoadError, match="broken.png"):
        adapter.load_batch([{"image": str(broken)}])


def test_load_batch_resizes_to_the_model_input(adapter, tmp_path):
    path = tmp_path / "wide.jpg"
    Image.fromarray(np.full((50, 90, 3), 200, dtype=np.uint8)).save(path)
    gray = tmp_path / "gray.png"
    Image.fromarray(np.full((160, 160), 10, dtype=np.uint8)).save(gray)
    x = adapter.load_batch([{"image": str(path)}, {"image": str(gray)}])
    assert x.shape == (2, 3, 160, 160) and x.dtype == torch.float32
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0


def test_build_loader_yields_ordered_batches(adapter, records):
    batches = list(adapter.build_loader(records, batch_size=2))
    assert [b.shape[0] for b in batches] == [2, 1]
    assert all(b.shape[1:] == (3, 160, 160) for b in batches)
    torch.testing.assert_close(torch.cat(batches), adapter.load_batch(records), rtol=0, atol=0)
    again = list(adapter.build_loader(records, batch_size=2))
    assert all(torch.equal(a, b) for a, b in zip(batches, again))


def test_loader_processes_give_the_same_batches_predictions_and_errors(adapter, records, tmp_path):
    workers = DetectorAdapter(batch_size=1, workers=2)  # three batches: the DataLoader path
    batches = list(workers.build_loader(records, batch_size=1))
    assert all(torch.equal(a, b) for a, b in zip(batches, adapter.build_loader(records, batch_size=1)))
    assert workers.predict(records) == DetectorAdapter(batch_size=1).predict(records)
    from yolozu.inference.predictor import (
        Predictor,  # BatchNorm-statistics and flip-TTA exports read through the loader too
    )

    in_process = Predictor(DetectorAdapter(batch_size=1)).predict(records, bn="batch", batch_size=1)
    assert Predictor(workers).predict(records, bn="batch", batch_size=1) == in_process
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    with pytest.raises(ImageLoadError, match=r"^cannot read image .*broken.png"):  # its own message, no traceback
        list(workers.build_loader([records[0], {"image": str(broken)}, records[1]], batch_size=1))
    with pytest.raises(ValueError, match="workers must be >= 0"):
        list(DetectorAdapter(workers=-1).build_loader(records, batch_size=1))


def test_loader_model_decode_pieces_reproduce_predict(adapter, records):
    preds = []
    with torch.no_grad():
        for start, x in zip(range(0, len(records), 2), adapter.build_loader(records, batch_size=2)):
            preds += adapter.decode(adapter.get_model()(x), records[start : start + 2])
    assert preds == adapter.predict(records)


def test_adapter_supports_ttt_and_readout_losses_are_finite_scalars(adapter, records):
    assert adapter.supports_ttt()
    readout = adapter.ttt_readout()
    assert readout.score_kind == "sigmoid" and readout.spatial and readout.recon_kwargs == {"recon": True}
    model = adapter.get_model()
    x = adapter.load_batch(records)
    with torch.no_grad():
        out = model(x, **readout.recon_kwargs)
    assert readout.recon(out).shape == x.shape
    assert readout.scores(out).shape == (3, 10, 40, 40)
    for name in ("peak_softmax", "sigmoid"):
        loss = tent_loss(out, DetectorAdapter(tent_loss=name).ttt_readout())
        assert loss.ndim == 0 and torch.isfinite(loss) and float(loss) > 0
    pickle.dumps(readout)


@functools.cache
def _readout(name, k=4):
    return DetectorAdapter(tent_loss=name, tent_peaks=k).ttt_readout()


def peak_softmax_entropy(output, k):
    return tent_loss(output, _readout("peak_softmax", k))


def sigmoid_entropy(output):
    return tent_loss(output, _readout("sigmoid"))


def test_the_readouts_give_the_tent_objective_in_closed_form():
    logits = torch.randn(2, 10, 8, 8, generator=torch.Generator().manual_seed(0))
    picked = gather_positions(logits, peak_indices(logits, 4))
    p = torch.softmax(picked, dim=1)
    torch.testing.assert_close(peak_softmax_entropy({"logits": logits}, 4), -(p * p.log()).sum(1).mean())
    q = torch.sigmoid(logits)
    binary = -(q * q.log() + (1 - q) * (1 - q).log()).mean()
    torch.testing.assert_close(sigmoid_entropy({"logits": logits}), binary)
    row = torch.softmax(logits[:, :, 0, 0], dim=1)
    torch.testing.assert_close(tent_loss(logits[:, :, 0, 0], Readout()), -(row * row.log()).sum(1).mean())


def test_peak_softmax_entropy_has_a_gradient_wrt_the_logits():
    logits = torch.randn(2, 10, 8, 8, generator=torch.Generator().manual_seed(0), requires_grad=True)
    loss = peak_softmax_entropy({"logits": logits}, k=4)
    (grad,) = torch.autograd.grad(loss, logits)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    # only the selected peaks receive gradient: 4 positions per image, all 10 classes
    assert int((grad.abs().sum(1) > 0).sum()) == 2 * 4
    g2 = torch.autograd.grad(sigmoid_entropy({"logits": logits}), logits)[0]
    assert (g2 != 0).float().mean() > 0.99


def test_peak_selection_picks_local_maxima_first():
    logits = torch.full((1, 10, 6, 6), -5.0)
    logits[0, 2, 1, 1] = 4.0
    logits[0, 2, 1, 2] = 3.0  # neighbour of the strongest peak: not a peak
    logits[0, 6, 4, 4] = 1.0
    idx = peak_indices(logits, 2)
    assert sorted(idx[0].tolist()) == [1 * 6 + 1, 4 * 6 + 4]
    assert gather_positions(logits, idx).shape == (1, 10, 2)


def test_tent_losses_run_under_vmap():
    _readout("peak_softmax", 4)  # built outside the transform (it loads a detector)
    logits = torch.randn(3, 2, 10, 8, 8)
    batched = torch.func.vmap(lambda z: peak_softmax_entropy({"logits": z}, k=4))(logits)
    looped = torch.stack([peak_softmax_entropy({"logits": z}, k=4) for z in logits])
    torch.testing.assert_close(batched, looped)
    grads = torch.func.vmap(torch.func.grad(lambda z: peak_softmax_entropy({"logits": z}, k=4)))(logits)
    assert grads.shape == logits.shape and torch.isfinite(grads).all()


def test_build_adapter_by_name():
    assert isinstance(build_adapter("dummy"), DummyAdapter)
    assert isinstance(build_adapter("detector", batch_size=4), DetectorAdapter)
    with pytest.raises(ValueError, match="detector.*dummy|dummy.*detector"):
        build_adapter("yolo11")
    with pytest.raises(ValueError, match="tent_loss"):
        DetectorAdapter(tent_loss="nope")


def test_detector_is_close_to_flip_equivariant(adapter, records):
    """Trained with mirrored images: detections on the mirrored input, mapped back, match the originals."""
    model = adapter.get_model()
    x = adapter.load_batch(records)
    with torch.no_grad():
        direct = adapter.decode(model(x), records)
        mirrored = adapter.decode(model(x.flip(-1)), records)
    matched = total = 0
    for a, b in zip(direct, mirrored):
        for d in (d for d in a["detections"] if d["score"] > 0.5):
            total += 1
            matched += any(
                e["class_id"] == d["class_id"]
                and abs(1.0 - e["bbox"]["cx"] - d["bbox"]["cx"]) < 0.02
                and abs(e["bbox"]["cy"] - d["bbox"]["cy"]) < 0.02
                for e in b["detections"]
                if e["score"] > 0.2
            )
    assert total >= 5 and matched / total >= 0.9
