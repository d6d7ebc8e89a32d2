"""PyTorch -> ONNX, with exact graph rewrites."""
