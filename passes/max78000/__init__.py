"""Everything MAX78000: the CNN accelerator's limits, its izer export and its student.

``check.py`` (``check.max78000``) checks the student against the accelerator's limits (layer
types, channels, kernel and data memory) and hands the same model on; ``izer.py``
(``export.izer``) takes the ``Bundle`` and writes Analog Devices' izer inputs (network YAML,
quantized checkpoint, sample and its expected output) into ``bundle/izer/``, simulated with the
accelerator's arithmetic against onnxruntime; ``ai8x.py`` is the ``ai8x-cnn`` student (the
layer shapes the accelerator runs); ``memory.py`` is izer's placement of a network (kernel slots
per processor, data memory offsets), which the check and the export share so that they agree.  The target itself is ``max78000`` in distillc.targets.
"""
