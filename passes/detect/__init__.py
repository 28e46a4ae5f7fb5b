"""Open-vocabulary detection: ``detect.open-vocab`` (``openvocab.py``), the decoders (``decode.py``).

``detect.open-vocab`` takes a ``TorchModel`` and makes one whose output is a detection map;
``eval.detection`` (in ``distillc.passes.eval.detection``) measures it.
"""
