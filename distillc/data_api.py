"""What a dataset plugin registers: a loader and a cheap fingerprint of what it would load."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class DatasetSource:
    """A named source of images (``[data] source = "<name>"``).

    ``load(image_size=, val_fraction=, seed=, path=, channels=)`` returns
    ``distillc.plugins.data.DataSplits``; ``fingerprint`` takes the same keywords and returns a
    string that changes whenever the loaded data would (it enters cache keys, so it must be cheap:
    file sizes and modification times, not contents).
    """

    name: str
    load: Callable[..., Any]
    fingerprint: Callable[..., str]
    needs_path: bool = False
    description: str = ""
    #: what ``path`` must be, checked by ``validate``: ``"file"``, ``"folder"`` or ``"any"``
    path_kind: str = "any"


def check_dataset(obj: Any) -> str | None:
    """A dataset source is a :class:`distillc.data_api.DatasetSource`."""
    return None if isinstance(obj, DatasetSource) else f"expected a distillc.data_api.DatasetSource, got {obj!r}"
