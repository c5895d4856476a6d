"""Without torchvision the torchvision tests skip, unless YOLOZU_REQUIRE_TORCHVISION=1 (make test sets it):
then they fail, so CI cannot pass having run none of them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

# tv_zoo imported with torchvision made unimportable (a meta path finder that refuses it)
_IMPORT_WITHOUT_TORCHVISION = """
import sys

class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "torchvision":
            raise ImportError("torchvision refused here")
        return None

sys.meta_path.insert(0, Refuse())
sys.path.insert(0, sys.argv[1])
import tv_zoo
"""


@pytest.mark.parametrize("required", ["1", None])
def test_a_missing_torchvision_fails_only_when_required(required):
    env = {k: v for k, v in os.environ.items() if k != "YOLOZU_REQUIRE_TORCHVISION"}
    if required:
        env["YOLOZU_REQUIRE_TORCHVISION"] = required
    done = subprocess.run(
        [sys.executable, "-c", _IMPORT_WITHOUT_TORCHVISION, str(TESTS)], capture_output=True, text=True, env=env,
        timeout=120,
    )
    assert done.returncode != 0 and "torchvision refused here" in done.stderr
    if required:
        assert "YOLOZU_REQUIRE_TORCHVISION=1 requires it: run make setup" in done.stderr
    else:
        assert "Skipped" in done.stderr and "requires it" not in done.stderr
