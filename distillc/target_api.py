"""Targets: where a bundle runs.  A target contributes the backend passes that end a plan."""

from __future__ import annotations

import abc
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field


class TargetConfig(BaseModel):
    """Keys of ``[target]`` shared by every target; a target may extend them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    flash_kb: int | None = Field(None, ge=1, description="flash available to the model (KiB)")
    ram_kb: int | None = Field(None, ge=1, description="RAM available to the model's arena (KiB)")


class Target(abc.ABC):
    """Base class of every target (built-in or a plugin's).

    ``backend_passes`` returns ``(pass name, config dict)`` pairs appended after the spec's own
    passes.  A pass the spec already lists is not appended again, so a spec can configure a
    backend pass by listing it.  Only these passes' cache keys see the target's config, which
    is why changing the target never re-runs training.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    Config: ClassVar[type[TargetConfig]] = TargetConfig

    def __init__(self, config: TargetConfig):
        self.config = config

    @abc.abstractmethod
    def backend_passes(self) -> list[tuple[str, dict[str, Any]]]:
        """The passes this target appends to every plan, in order."""
