"""yolozu: test-time training for detectors on a functional core (torch.func)."""

__version__ = "0.1.0"
