"""edgestar: StarNet from a PyTorch checkpoint to a validated INT8 TFLite model."""

__version__ = "0.1.0"
