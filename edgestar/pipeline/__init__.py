"""The commands' stages over a run directory: quantize, train, the manifest."""
