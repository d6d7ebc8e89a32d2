"""StarNet itself: the variants, checkpoints and the exact model transforms (BatchNorm folding, depthwise splits)."""
