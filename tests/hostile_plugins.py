"""Plug-in adapters that misbehave, one way each (``--adapter hostile_plugins:NAME``; tests/ is on sys.path): the
fixture module of tests/test_plugin_contract.py and tests/test_commit_faults.py. A plug-in is untrusted code:
each of these must end the export with one line naming it and exit 1, nothing written."""

from __future__ import annotations

import os
import signal

import numpy as np

from yolozu.adapter import DummyAdapter


class _Predicts(DummyAdapter):
    """A dummy adapter whose predictions ``change(records)`` gives."""

    def __init__(self, change, **options) -> None:
        self.change = change

    def predict(self, records):
        return self.change(records)


def _one(records, score=0.5, class_id=0, image=None):
    det = {"class_id": class_id, "score": score, "bbox": {"cx": 0.5, "cy": 0.5, "w": 0.2, "h": 0.2}}
    return [{"image": image or str(r["image"]), "detections": [det]} for r in records]


def good(**options):
    return _Predicts(_one)


def raises(**options):
    raise RuntimeError("the factory failed")


def no_kwargs():
    return DummyAdapter()


def predict_raises(**options):
    def fail(records):
        raise KeyError("boom")

    return _Predicts(fail)


def predict_generator(**options):
    return _Predicts(lambda records: (p for p in _one(records)))


def numpy_scores(**options):
    return _Predicts(lambda records: [{**p, "detections": [{**d, "score": np.float32(0.5)} for d in p["detections"]]}
                                      for p in _one(records)])


def too_few(**options):
    return _Predicts(lambda records: _one(records)[:-1])


def score_5(**options):
    return _Predicts(lambda records: _one(records, score=5.0))


def class_minus_1(**options):
    return _Predicts(lambda records: _one(records, class_id=-1))


def other_image(**options):
    return _Predicts(lambda records: _one(records, image="/elsewhere/other.png"))


def exits(**options):
    raise SystemExit(0)


def swallows_ctrl_c(**options):
    """Ctrl-C arrives while the plug-in builds, and the plug-in swallows it (as code with ``except BaseException``
    does): the run must still end with exit 130 and write nothing."""
    try:
        os.kill(os.getpid(), signal.SIGINT)
    except BaseException:  # noqa: B036 - the point of this fixture
        pass
    return DummyAdapter()


not_callable = 42
