"""distillc's built-in passes, one folder per stage of a compile (installed as ``distillc.passes``).

=============  ==================================================  ===============================
folder         passes                                              takes -> makes
=============  ==================================================  ===============================
sources.py     teacher.train, teacher.load, student.init,          nothing -> TorchModel / OnnxModel
               student.onnx
distill/       distill.feature, distill.ca-dssl, distill.bootleg,  TorchModel -> TorchModel
               distill.comad, distill.clip-matryoshka,
               train.supervised, matryoshka
eval/          eval.linear-probe, eval.zero-shot, eval.detection   a model -> the same model
detect/        detect.open-vocab (and the detection decoders)      TorchModel -> TorchModel
quantize/      quantize.brevitas-qat                               TorchModel -> QuantTorchModel
export/        export.onnx, simplify.onnxsim                       QuantTorchModel -> OnnxModel
backend/       tvm.int8, plan-memory, codegen.c (and the INT8      OnnxModel -> Int8Program -> Bundle
               library they wrap)
verify/        verify.host, verify.qemu                            Bundle -> Bundle (+ metrics)
max78000/      check.max78000, export.izer, the ai8x-cnn student   a model -> the same; Bundle -> Bundle
=============  ==================================================  ===============================

Every module that defines passes registers them through the ``distillc_register_passes`` hook,
the same hook a third-party plugin implements (see ``distillc.plugin_manager.BUILTIN_PLUGINS``).
"""
