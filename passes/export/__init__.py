"""Export: the quantized student as a QCDQ ONNX model, checked against the torch model.

Takes a ``QuantTorchModel`` and makes an ``OnnxModel``: ``to_onnx.py`` (``export.onnx``, Brevitas'
QCDQ exporter, compared with the Brevitas model on real images) and ``simplify.py``
(``simplify.onnxsim``, ``OnnxModel -> OnnxModel``).
"""
