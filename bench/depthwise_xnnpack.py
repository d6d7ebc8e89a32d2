"""Why ``--target cpu`` splits 7x7 depthwise convs: one depthwise conv per row, timed alone.

    python bench/depthwise_xnnpack.py

Each row is a one-op (or few-op) TFLite model built with Keras, FP32 and INT8 (per-channel,
calibrated on random data), timed with ai-edge-litert at 1 thread: XNNPACK (the default
delegate) and TFLite's builtin kernels. Shapes are StarNet-S1's at 224 px.
"""
from __future__ import annotations

import time

import numpy as np


def latency_ms(model: bytes, x: np.ndarray, xnnpack: bool, iters: int = 200) -> float:
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    resolver = OpResolverType.AUTO if xnnpack else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    interp = Interpreter(model_content=model, num_threads=1, experimental_op_resolver_type=resolver)
    interp.allocate_tensors()
    inp = interp.get_input_details()[0]
    if inp["dtype"] != np.float32:
        scale, zero = inp["quantization"]
        x = np.clip(np.round(x / scale + zero), -128, 127).astype(inp["dtype"])
    interp.set_tensor(inp["index"], x)
    for _ in range(10):
        interp.invoke()
    t0 = time.perf_counter()
    for _ in range(iters):
        interp.invoke()
    return (time.perf_counter() - t0) / iters * 1000


def tflite_pair(build, shape):
    """FP32 and INT8 flatbuffers of the Keras graph ``build(input)``."""
    import tensorflow as tf

    inp = tf.keras.Input(shape, batch_size=1)
    model = tf.keras.Model(inp, build(inp))
    fp32 = tf.lite.TFLiteConverter.from_keras_model(model).convert()
    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    rng = np.random.default_rng(0)
    conv.representative_dataset = lambda: ([rng.standard_normal((1, *shape)).astype(np.float32)]
                                           for _ in range(20))
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv.inference_input_type = conv.inference_output_type = tf.int8
    return fp32, conv.convert()


def main():
    import tensorflow as tf

    layers = tf.keras.layers

    def dw(k, dilation=1):
        return lambda x: layers.DepthwiseConv2D(k, padding="same", dilation_rate=dilation)(x)

    def split7(x):  # what edgestar.models.DilatedSplitConv makes of a 7x7 conv
        return layers.Add()([layers.DepthwiseConv2D((3, 7), padding="same", dilation_rate=(2, 1))(x),
                             layers.DepthwiseConv2D((4, 3), padding="same", dilation_rate=2)(x),
                             layers.DepthwiseConv2D((4, 4), padding="same", dilation_rate=2)(x)])

    rows = [
        ("depthwise 3x3", dw(3), (56, 56, 96)),
        ("depthwise 5x5", dw(5), (56, 56, 96)),
        ("depthwise 7x7", dw(7), (56, 56, 96)),
        ("7x7 split: 3x7 + 4x3 + 4x4 dilated, 2 ADD", split7, (56, 56, 96)),
        ("depthwise 7x7", dw(7), (56, 56, 24)),
        ("7x7 split", split7, (56, 56, 24)),
        ("depthwise 7x7", dw(7), (7, 7, 192)),
        ("7x7 split", split7, (7, 7, 192)),
    ]
    print("| op | shape (HxWxC) | FP32 XNNPACK | FP32 builtin | INT8 XNNPACK | INT8 builtin |")
    print("|---|---|---|---|---|---|")
    for name, build, shape in rows:
        fp32, int8 = tflite_pair(build, shape)
        x = np.random.default_rng(1).standard_normal((1, *shape)).astype(np.float32)
        times = [latency_ms(m, x, xnn) for m in (fp32, int8) for xnn in (True, False)]
        print(f"| {name} | {'x'.join(map(str, shape))} | " + " | ".join(f"{t:.3f} ms" for t in times) + " |",
              flush=True)


if __name__ == "__main__":
    main()
