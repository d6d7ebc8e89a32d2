"""One runner per engine (PyTorch, ONNX Runtime, LiteRT, TFLite Micro) and the shared validator."""
