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

    ``options`` is a pydantic model of the source's own settings (``[data] options = {...}``):
    ``validate`` checks the table against it (problems named ``data.options.<key>``), and ``load``
    and ``fingerprint`` then get one more keyword, ``options``, the validated table as a plain
    dict with the defaults filled in.  None (the default): the source takes no options, and
    ``load``/``fingerprint`` never see the keyword.
    """

    name: str
    load: Callable[..., Any]
    fingerprint: Callable[..., str]
    needs_path: bool = False
    description: str = ""
    #: what ``path`` must be, checked by ``validate``: ``"file"``, ``"folder"`` or ``"any"``
    path_kind: str = "any"
    #: a pydantic model of ``[data] options``, or None: the source takes none
    options: type | None = None


def check_dataset(obj: Any) -> str | None:
    """A dataset source is a :class:`distillc.data_api.DatasetSource`."""
    return None if isinstance(obj, DatasetSource) else f"expected a distillc.data_api.DatasetSource, got {obj!r}"
