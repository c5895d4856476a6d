"""Deprecated path of the export command, kept for one release: ``yolozu.cli.export`` is its home."""

from yolozu.cli.export import *  # noqa: F401,F403
from yolozu.cli.export import build_parser, flag_of, main, run_export, ttt_config, ttt_meta  # noqa: F401
from yolozu.io.predictions import SCHEMA_VERSION  # noqa: F401
