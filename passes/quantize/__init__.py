"""Stage 3, quantization-aware training with Brevitas.

Takes a float ``TorchModel`` and makes a ``QuantTorchModel`` (the Brevitas model's state: folded
weights, learned scales).  ``brevitas_qat.py`` is the pass (``quantize.brevitas-qat``, keeping the
spec's distillation objective); ``brevitas_model.py`` builds the Brevitas graph of a student
(``quantize``, ``QuantStudent``) and exports it as QCDQ ONNX (``export_qcdq``).
"""
