"""The shift benchmark: method recipes, the in-process runner, peak-memory probes and the markdown report."""
