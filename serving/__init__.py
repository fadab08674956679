"""Serving side of cltvit: ONNX Runtime, numpy and Pillow only (never torch, training/ or export/)."""


def __getattr__(name: str):  # lazy: `import serving` stays cheap (no ONNX Runtime import)
    if name == "Explainer":
        from serving.explainer import Explainer

        return Explainer
    raise AttributeError(f"module 'serving' has no attribute {name!r}")


__all__ = ["Explainer"]
