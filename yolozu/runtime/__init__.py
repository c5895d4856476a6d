"""Process-wide switches: deterministic kernels and named fault points."""
