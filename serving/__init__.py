"""Serving side of cltvit: ONNX Runtime, numpy and Pillow only (never torch, training/ or export/)."""
