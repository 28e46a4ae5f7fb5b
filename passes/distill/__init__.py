"""Stage 1, distillation: a frozen teacher's knowledge into the student, without labels.

Takes the student's ``TorchModel`` (and the teachers it names, as side inputs) and makes a trained
``TorchModel`` of the same architecture.  ``base.py`` holds the training loop every method
shares (``DistillationPass``); ``feature``, ``cadssl`` (CA-DSSL), ``bootleg``, ``comad``, ``clip``
(TinyVLM's CLIP -> Matryoshka) and ``supervised`` are the methods; ``matryoshka`` inserts the
nested-embedding head (stage 2) and may store INT8 class embeddings for zero-shot classification.
See docs/methods.md.
"""
