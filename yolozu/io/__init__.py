"""Predictions on disk: the schema, output path checks and the all-or-nothing commit of a run's files."""
