"""The package version (one place: the package, the ONNX producer and the wheel read it)."""

__version__ = "0.1.0"
