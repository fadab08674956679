"""Export: the fused ViT + CLT explainer ONNX graph, the text tower, reduced-precision variants, bundles.

`export_bundle(backbone, clt, mode, labels, templates, out_dir)` writes a bundle (docs/bundle.md);
`load_bundle(dir)` validates one (re-exported from the torch-free `serving.bundle`).
"""
from serving.bundle import BundleError, BundlePaths, Manifest, load_bundle

from .bundle import ExportError, export_bundle

__all__ = ["BundleError", "BundlePaths", "ExportError", "Manifest", "export_bundle", "load_bundle"]
