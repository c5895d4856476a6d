"""Inference: an adapter's predictions with a chosen BatchNorm normalisation, and flip test-time augmentation."""
