"""The stateful shell of test-time training: the names YOLOZU users call, over ``yolozu.functional``."""

from yolozu.tta.config import TTTConfig
from yolozu.tta.integration import run_ttt
from yolozu.tta.report import TTTReport
from yolozu.tta.tent import TentConfig, TentRunner
from yolozu.tta.ttt_mim import TTTMIMResult, run_ttt_mim

__all__ = ["TTTConfig", "run_ttt", "TTTReport", "TentConfig", "TentRunner", "run_ttt_mim", "TTTMIMResult"]
