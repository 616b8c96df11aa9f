"""TensorRT: engines built from the ONNX graphs (build.py) and the static parser check (compat.py)."""
