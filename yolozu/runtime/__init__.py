"""Process-wide switches: deterministic kernels, named fault points and the interrupt latch."""
