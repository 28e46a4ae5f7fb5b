"""Built-in dataset sources: sklearn-digits and digit-scenes (no download), npz, image-folder, cifar,
webdataset, coco-detection (local files).

The loaders live in :mod:`distillc.plugins.data` (images and labels) and
:mod:`distillc.plugins.detection_data` (images and boxes); this plugin registers them.  Importing
the loaders pulls in torch, so it happens on first use, not at registration; the detection
sources' option models (:mod:`distillc.plugins.detection_options`) are light and registered with them.
"""

from __future__ import annotations

from typing import Any

from distillc import hookimpl
from distillc.data_api import DatasetSource
from distillc.plugins.detection_options import CocoDetectionOptions, DigitScenesOptions

#: name -> (what ``path`` is, or None: no path; description)
_SOURCES = {
    "sklearn-digits": (None, "scikit-learn's 8x8 handwritten digits; ships offline"),
    "npz": ("file", "a NumPy .npz with x (and y, x_val, y_val)"),
    "image-folder": ("folder", "root/<class>/*.png|jpg"),
    "cifar": ("folder", "CIFAR-10/100 python-pickle folder (data_batch_*, test_batch)"),
    "webdataset": ("any", "WebDataset .tar shards (a shard or a folder of them): image + optional .cls"),
    "digit-scenes": (None, "scenes of 1-4 scikit-learn digits with boxes, seen/unseen classes; ships offline"),
    "coco-detection": ("folder", "images + a COCO instances JSON (boxes, categories, iscrowd)"),
}

#: The sources with boxes (:mod:`distillc.plugins.detection_data`) and their options models.
_DETECTION = {"digit-scenes": ("load_digit_scenes", DigitScenesOptions),
              "coco-detection": ("load_coco_detection", CocoDetectionOptions)}


def _loader(source: str) -> Any:
    def load(**kwargs: Any) -> Any:
        if source in _DETECTION:
            from distillc.plugins import detection_data

            return getattr(detection_data, _DETECTION[source][0])(**kwargs)
        from distillc.plugins import data

        return data.load_dataset(source, **kwargs)

    return load


def _fingerprint(source: str) -> Any:
    def fingerprint(**kwargs: Any) -> str:
        from distillc.plugins.data_fingerprint import fingerprint as data_fingerprint

        return data_fingerprint(source, **kwargs)

    return fingerprint


@hookimpl
def distillc_register_datasets(registry: Any) -> None:
    for name, (path_kind, description) in _SOURCES.items():
        registry.add(name, DatasetSource(name=name, load=_loader(name), fingerprint=_fingerprint(name),
                                         needs_path=path_kind is not None, path_kind=path_kind or "any",
                                         description=description,
                                         options=_DETECTION[name][1] if name in _DETECTION else None))
