"""Datasets in the YOLO layout: ``build_manifest`` reads a split's images and labels into records.

The demo data (synthetic digit images, ImageNet-C corruptions) is made by ``yolozu.demo``, not here.
"""

from yolozu.data.manifest import ManifestError, build_manifest

__all__ = ["ManifestError", "build_manifest"]
