"""The one Pass protocol: every step of a compile, built-in or third-party, is a Pass.

A pass is a small class with a name, a version, a pydantic ``Config`` (its spec keys), the
artifact type it ``takes`` and the one it ``makes``, and ``run``.  It knows nothing about the
cache, the CLI or progress rendering: the pipeline hands it a :class:`PassContext`.

Reading order of a pass file: config, then ``run``, then helpers.
"""

from __future__ import annotations

import abc
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Callable, ClassVar, Literal, Sequence

from pydantic import BaseModel, ConfigDict, StringConstraints

from distillc.artifacts import Artifact
from distillc.spec import NAME_PATTERN

if TYPE_CHECKING:  # pragma: no cover
    from distillc.registry import Plugins
    from distillc.progress import ProgressReporter


#: The config keys a pass may list in ``Pass.planned``, and what the planner fills into them.
PLANNED_KEYS = {
    "model_name": "the spec's name ([distillc] name)",
    "dataset": "the data source ([data] source), or 'random' where the inputs are random",
    "inputs": "where a backend pass takes the model's inputs from: 'data' (validation images) or "
              "'random' (seeded random int8 values: an ONNX student and no [data] section)",
}
#: The types of the planned keys, so every pass that lists one accepts what the planner fills in
#: (each Config gives its own default and description through ``Field``).
ModelName = Annotated[str, StringConstraints(pattern=NAME_PATTERN, max_length=64)]
InputSource = Literal["data", "random"]


class PassConfig(BaseModel):
    """Base of every pass's config: unknown keys are errors, values are validated.

    Strict: a spec's TOML gives real types, so ``epochs = "3"`` is refused rather than coerced
    (an int still fits a float key).  A list key is ``list[...]`` (strict mode refuses a TOML
    list for ``tuple[...]``); a ``Path`` key needs ``Annotated[Path, Strict(False)]`` to take a
    string.  No float key takes ``inf`` or ``nan``: they pass range checks (``nan`` compares
    false) and train a NaN model.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


@dataclass
class PassResult:
    """What a pass returns: its output artifact and the metrics it measured (JSON-able)."""

    artifact: Artifact
    metrics: dict[str, Any] = field(default_factory=dict)


class Pass(abc.ABC):
    """Base class of every pass.

    Class attributes a pass sets:

    - ``name``: the name a spec uses (``use = "distill.feature"``).
    - ``version``: bump it when the output for the same input and config changes; it is part of
      the cache key.
    - ``Config``: a :class:`PassConfig` subclass describing the pass's spec keys.
    - ``takes`` / ``makes``: artifact types; ``takes = None`` for a source (first) pass.
    - ``passthrough``: the pass only measures; it returns its input, whose type it keeps
      (``makes`` is then the widest type it can return, for listings).
    - ``uses_data``: whether the dataset's fingerprint belongs in the cache key.
    - ``tools``: distributions whose versions belong in the cache key (e.g. ``("torch",)``).
    - ``distributed``: under torchrun the pass runs on every rank together (it trains
      data-parallel, see ``distillc.distributed``); otherwise rank 0 runs it alone.
    - ``planned``: config keys (from :data:`PLANNED_KEYS`) the planner fills in unless the spec
      sets them: what a pass needs to know about the spec beyond its own keys reaches it this
      way, and so is in the pass's cache key.
    """

    name: ClassVar[str]
    version: ClassVar[str] = "1"
    description: ClassVar[str] = ""
    Config: ClassVar[type[PassConfig]] = PassConfig
    takes: ClassVar[type[Artifact] | tuple[type[Artifact], ...] | None] = None
    makes: ClassVar[type[Artifact]]
    passthrough: ClassVar[bool] = False
    uses_data: ClassVar[bool] = False
    tools: ClassVar[tuple[str, ...]] = ()
    distributed: ClassVar[bool] = False
    planned: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: PassConfig):
        self.config = config

    def teachers(self) -> list[str]:
        """Names of the spec's teachers this pass reads (their artifacts enter its cache key).

        The default reads a ``teacher`` (str) or ``teachers`` (list) config key.
        """
        single = getattr(self.config, "teacher", None)
        many = getattr(self.config, "teachers", None)
        names = ([single] if isinstance(single, str) else []) + (list(many) if isinstance(many, list) else [])
        return names

    def teacher_requirements(self) -> dict[str, tuple[str, str]]:
        """Keys of ``[[teachers]]`` entries this pass's config needs: ``{config key: (teacher name,
        teacher key)}``, e.g. ``{"classes": ("clip", "tokenizer")}``.  ``validate`` names the
        config key when the teacher entry lacks one.  The default needs none."""
        return {}

    def link(self, upstream: Sequence["Pass"], source: str) -> None:
        """Called once when the plan is built, with the flow passes that run before this one.

        A pass that builds on an earlier pass's settings resolves them here (the QAT pass finds
        the distillation objective it keeps) and raises :class:`~distillc.errors.SpecError`
        with ``source`` (the step's place in the spec) when it cannot.  The default does nothing.
        """

    def linked_key(self) -> dict[str, Any]:
        """What :meth:`link` resolved that changes this pass's output: it joins the cache key."""
        return {}

    @abc.abstractmethod
    def run(self, artifact: Artifact | None, ctx: "PassContext") -> PassResult:
        """Map the input artifact (None for a source pass) to a :class:`PassResult`."""

    @classmethod
    def takes_names(cls) -> str:
        if cls.takes is None:
            return "-"
        types = cls.takes if isinstance(cls.takes, tuple) else (cls.takes,)
        return " | ".join(t.kind for t in types)

    @classmethod
    def output_type(cls, input_type: type[Artifact] | None) -> type[Artifact]:
        """The artifact type this pass makes from ``input_type``."""
        return input_type if cls.passthrough and input_type is not None else cls.makes

    @classmethod
    def accepts(cls, artifact_type: type[Artifact] | None) -> bool:
        if cls.takes is None or artifact_type is None:
            return cls.takes is None and artifact_type is None
        # Exact types: a QuantTorchModel is stored like a TorchModel, but a pass that trains a
        # float model must not receive one unless it says so.
        types = cls.takes if isinstance(cls.takes, tuple) else (cls.takes,)
        return artifact_type in types


@dataclass
class PassContext:
    """Everything a running pass may use besides its input artifact.

    ``teachers`` maps each teacher name the pass asked for to its loaded artifact, and
    ``teacher_keys`` to that artifact's cache key.  ``scratch`` is an empty directory the pass may
    write to (files an artifact points at are copied into the cache).  ``checkpoint_dir``
    survives an interrupted run so training resumes from the last finished epoch.
    ``derived_dir`` is a cache folder shared by all runs for data derived from cached
    artifacts (e.g. a frozen teacher's targets), keyed by whoever writes there.
    ``data_fingerprint`` identifies the dataset (see ``DatasetSource.fingerprint``).  ``seed`` is
    the spec's ``[distillc] seed``.

    There is no spec here on purpose: a pass sees only what its cache key covers (its config,
    input, teachers, data and seed).  Anything else it needs about the spec, such as the spec's
    name, reaches it as a config key the planner fills in (``Pass.planned``).
    """

    plugins: "Plugins"
    progress: "ProgressReporter"
    scratch: Path
    checkpoint_dir: Path
    step_id: str
    load_data: Callable[[], Any]
    seed: int
    teachers: dict[str, Artifact] = field(default_factory=dict)
    teacher_keys: dict[str, str] = field(default_factory=dict)
    derived_dir: Path | None = None
    data_fingerprint: str = ""

    @property
    def data(self) -> Any:
        """The dataset splits (loaded on first use and shared by every pass of a compile)."""
        return self.load_data()

    def log(self, message: str) -> None:
        self.progress.log(f"[{self.step_id}] {message}")


def check_pass(obj: Any) -> str | None:
    """A pass is a concrete subclass of :class:`distillc.pass_api.Pass` with a name and a ``makes``."""
    if not (isinstance(obj, type) and issubclass(obj, Pass)):
        return f"expected a subclass of distillc.pass_api.Pass, got {obj!r}"
    if not isinstance(getattr(obj, "name", None), str) or not obj.name:
        return f"pass class {obj.__qualname__} has no 'name'"
    makes = getattr(obj, "makes", None)
    if not (isinstance(makes, type) and issubclass(makes, Artifact)):
        return f"pass class {obj.__qualname__} has no 'makes' (the Artifact type it produces)"
    if inspect.isabstract(obj):
        return f"pass class {obj.__qualname__} does not implement {', '.join(sorted(obj.__abstractmethods__))}"
    fields = getattr(getattr(obj, "Config", None), "model_fields", {})
    for key in getattr(obj, "planned", ()):
        if key not in PLANNED_KEYS or key not in fields:
            return (f"pass class {obj.__qualname__} lists {key!r} in 'planned', which must name a key of its "
                    f"Config among {', '.join(PLANNED_KEYS)}")
    return None
