"""The demo and benchmark part of yolozu: synthetic digit data, ImageNet-C corruptions, detector training,
the robustness table, the shift benchmark and log plots.

It needs the ``demo`` extra (scikit-image, scikit-learn, scipy, matplotlib, mlxtend). It may import the
library; the library (everything else under ``yolozu``) never imports it, so ``yolozu`` works without the extra.
"""
