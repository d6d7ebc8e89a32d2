"""ONNX -> TFLite: the parent-side client (``client``), the TensorFlow worker (``worker``), the
``.tflite`` flatbuffer reader/writer (``tflite_file``) and the deployability check
(``deployable``).

This file holds only the format vocabulary, so that option parsing needs no NumPy.
"""

FORMATS = ("fp32", "int8", "fp16", "dynamic")
IO_TYPES = ("int8", "uint8", "float")  # input/output type of the INT8 model
