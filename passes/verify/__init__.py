"""Verification: the bundle's C against onnxruntime, on the host and on an emulated Cortex-M.

Takes a ``Bundle`` and makes the same ``Bundle`` with its verification in the manifest:
``host_qemu.py`` holds ``verify.host`` (gcc) and ``verify.qemu`` (arm-none-eabi-gcc + QEMU,
instructions per inference); ``layercheck.py`` explains an end-to-end difference kernel by kernel
(only float32 .5 ties may differ, ``end_to_end = "explain"``).
"""
