"""Built-in dataset sources: sklearn-digits (no download), npz, image-folder, cifar, webdataset (local files).

The loaders live in :mod:`distillc.plugins.data`; this plugin registers them.  Importing the
loaders pulls in torch, so it happens on first use, not at registration.
"""

from __future__ import annotations

from typing import Any

from distillc import hookimpl
from distillc.data_api import DatasetSource

#: name -> (what ``path`` is, or None: no path; description)
_SOURCES = {
    "sklearn-digits": (None, "scikit-learn's 8x8 handwritten digits; ships offline"),
    "npz": ("file", "a NumPy .npz with x (and y, x_val, y_val)"),
    "image-folder": ("folder", "root/<class>/*.png|jpg"),
    "cifar": ("folder", "CIFAR-10/100 python-pickle folder (data_batch_*, test_batch)"),
    "webdataset": ("any", "WebDataset .tar shards (a shard or a folder of them): image + optional .cls"),
}


def _loader(source: str) -> Any:
    def load(**kwargs: Any) -> Any:
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
                                         description=description))
