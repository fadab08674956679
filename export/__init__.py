"""Export: the fused ViT + CLT explainer ONNX graph, the text tower, reduced-precision variants, the bundle writer.

`export.writer.export_bundle(backbone, clt, mode, labels, templates, out_dir)` writes a bundle; the
format itself (and `load_bundle`, which validates one) lives in the torch-free `bundle` package.
"""
