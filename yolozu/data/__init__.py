"""Demo shift-benchmark data: synthetic digit detection images, YOLO manifests and ImageNet-C corruptions."""

from yolozu.data.manifest import ManifestError, build_manifest

__all__ = ["ManifestError", "build_manifest"]
