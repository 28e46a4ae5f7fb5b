"""Evaluation: measures a model and hands it on unchanged (``passthrough``).

Takes a ``TorchModel`` or ``QuantTorchModel`` and makes the same artifact, with metrics:
``eval.linear-probe`` (``probe.py``: full and few-shot linear probes on frozen embeddings) and
``eval.zero-shot`` (``zeroshot.py``: cosine similarity to class embeddings, per Matryoshka dim).
``gate.py`` is the quality gate they and ``quantize.brevitas-qat`` apply to the model they measure.
``detection.py`` is ``eval.detection``: COCO mAP of a detection model per dim, seen and unseen classes.
"""
