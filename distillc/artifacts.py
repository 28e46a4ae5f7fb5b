"""The typed artifacts that flow between passes, and how each is stored in the cache.

Every artifact saves itself into a directory and loads back from one.  Nothing is pickled:
torch weights go to safetensors next to a JSON recipe that rebuilds the module through the
student/teacher registries; ONNX models and bundles are files.
"""

from __future__ import annotations

import abc
import importlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from distillc.registry import Plugins


#: The passes that rebuild a head or a quantization when an older recipe does not name one.
DEFAULT_HEAD_PASS = "matryoshka"
DEFAULT_QUANT_PASS = "quantize.brevitas-qat"


class Artifact(abc.ABC):
    """Base of every artifact type; ``kind`` is the name shown in plans and errors.

    The cache records the class by import path, so a plugin's own artifact types load back
    without any registration.
    """

    kind: ClassVar[str] = "Artifact"

    @abc.abstractmethod
    def save(self, directory: Path) -> None:
        """Write the artifact into the (new, empty) cache entry ``directory``."""

    @classmethod
    @abc.abstractmethod
    def load(cls, directory: Path) -> "Artifact":
        """Read an artifact back from a cache entry written by :meth:`save`."""

    def describe(self) -> dict[str, Any]:
        """A small JSON-able summary for report.json."""
        return {"kind": self.kind}


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


@dataclass
class TorchModel(Artifact):
    """A PyTorch model as (role, arch, options) + a state dict.

    ``role`` is ``"student"`` or ``"teacher"`` and picks the registry whose builder rebuilds the
    module: ``builder(**options)``.  ``meta`` carries facts later passes need (image size,
    embedding width, parameter count).  ``head`` is the recipe of a head put on the student's
    embedding (e.g. a Matryoshka projection), or None; the rebuilt module is then
    ``head(builder(**options)(x))``.  The core knows no head: the pass that added it (named by
    ``head["pass"]``, by default ``matryoshka``) rebuilds it with its ``attach_head(module,
    recipe)`` class method, so a plugin's pass may add heads of its own.
    """

    kind: ClassVar[str] = "TorchModel"
    role: str
    arch: str
    options: dict[str, Any]
    state: dict[str, "torch.Tensor"]
    meta: dict[str, Any] = field(default_factory=dict)
    head: dict[str, Any] | None = None

    @classmethod
    def from_module(cls, module: "torch.nn.Module", *, role: str, arch: str, options: dict[str, Any],
                    meta: dict[str, Any] | None = None, head: dict[str, Any] | None = None) -> "TorchModel":
        state = {k: v.detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items()}
        head = head or getattr(module, "head_recipe", None)  # a module built with a head keeps it
        return cls(role=role, arch=arch, options=dict(options), state=state, meta=dict(meta or {}),
                   head=dict(head) if head else None)

    def fresh_module(self, plugins: "Plugins") -> "torch.nn.Module":
        """The architecture (with its head, if any) freshly initialised, without these weights."""
        registry = plugins.students if self.role == "student" else plugins.teachers
        module = registry.get(self.arch)(**self.options)
        if self.head is not None:  # the pass that added the head rebuilds it (see the class docstring)
            module = plugins.passes.get(self.head.get("pass", DEFAULT_HEAD_PASS)).attach_head(module, self.head)
        return module

    def build(self, plugins: "Plugins") -> "torch.nn.Module":
        """Rebuild the module (on CPU, eval mode) with this artifact's weights."""
        module = self.fresh_module(plugins)
        module.load_state_dict(self.state, strict=True)
        return module.eval()

    def save(self, directory: Path) -> None:
        from safetensors.torch import save_file

        save_file(self.state, str(directory / "model.safetensors"))
        info = {"role": self.role, "arch": self.arch, "options": self.options, "meta": self.meta}
        if self.head is not None:
            info["head"] = self.head
        _write_json(directory / "model.json", info)

    @classmethod
    def load(cls, directory: Path) -> "TorchModel":
        from safetensors.torch import load_file

        info = json.loads((directory / "model.json").read_text())
        state = load_file(str(directory / "model.safetensors"))
        return cls(role=info["role"], arch=info["arch"], options=info["options"], state=state,
                   meta=info.get("meta", {}), head=info.get("head"))

    def describe(self) -> dict[str, Any]:
        described = {"kind": self.kind, "role": self.role, "arch": self.arch, "options": self.options,
                     "meta": self.meta}
        if self.head is not None:
            described["head"] = self.head
        return described


@dataclass
class QuantTorchModel(TorchModel):
    """A Brevitas-quantized student: the float recipe, the quantization settings, and the
    quantized state dict (folded weights and learned scales).

    Rebuilding re-applies the same graph quantization to a fresh float module and loads the
    state, which reproduces the quantized model exactly.
    """

    kind: ClassVar[str] = "QuantTorchModel"
    quant: dict[str, Any] = field(default_factory=dict)

    def build(self, plugins: "Plugins") -> "torch.nn.Module":
        """The quantizing pass (``quant["pass"]``, by default ``quantize.brevitas-qat``) re-applies
        its quantization to a fresh float module and loads this state (``rebuild_quantized``)."""
        owner = plugins.passes.get(self.quant.get("pass", DEFAULT_QUANT_PASS))
        return owner.rebuild_quantized(self, self.fresh_module(plugins).eval()).eval()

    def save(self, directory: Path) -> None:
        super().save(directory)
        _write_json(directory / "quant.json", self.quant)

    @classmethod
    def load(cls, directory: Path) -> "QuantTorchModel":
        base = TorchModel.load(directory)
        quant = json.loads((directory / "quant.json").read_text())
        return cls(role=base.role, arch=base.arch, options=base.options, state=base.state, meta=base.meta,
                   head=base.head, quant=quant)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "quant": self.quant}


@dataclass
class FileArtifact(Artifact):
    """An artifact that is one file (``filename`` inside the cache entry) plus JSON metadata."""

    filename: ClassVar[str] = "artifact.bin"
    path: Path
    meta: dict[str, Any] = field(default_factory=dict)

    def save(self, directory: Path) -> None:
        shutil.copyfile(self.path, directory / self.filename)
        _write_json(directory / "meta.json", self.meta)

    @classmethod
    def load(cls, directory: Path) -> "FileArtifact":
        return cls(path=directory / cls.filename, meta=json.loads((directory / "meta.json").read_text()))

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "file": self.filename, "meta": self.meta}


@dataclass
class OnnxModel(FileArtifact):
    """An ONNX model file: float, or QCDQ as Brevitas exports it."""

    kind: ClassVar[str] = "OnnxModel"
    filename: ClassVar[str] = "model.onnx"


REFERENCE_ONNX = "reference.onnx"


@dataclass
class Int8Program(Artifact):
    """A lowered integer program: kernel C, the call sequence, constants, and (once planned) the
    arena plan.  TVM 0.27 cannot serialise Relax modules holding constants, so the backend
    caches this plain form instead (``program.json``, ``constants.bin``, ``kernels.c``).
    """

    kind: ClassVar[str] = "Int8Program"
    path: Path
    plan: dict[str, Any] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def reference_onnx(self) -> Path:
        """The ONNX model this program was lowered from (kept for verification)."""
        return self.path / REFERENCE_ONNX

    def save(self, directory: Path) -> None:
        shutil.copytree(self.path, directory / "program")
        _write_json(directory / "plan.json", {"plan": self.plan, "meta": self.meta})

    @classmethod
    def load(cls, directory: Path) -> "Int8Program":
        info = json.loads((directory / "plan.json").read_text())
        return cls(path=directory / "program", plan=info["plan"], meta=info["meta"])

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "planned": self.plan is not None, "meta": self.meta}


@dataclass
class Bundle(Artifact):
    """The compiler's product: a directory of C sources, build files and ``manifest.json``.

    ``reference`` is the ONNX model the bundle was compiled from; verification compares the
    bundle's outputs with onnxruntime on it.
    """

    kind: ClassVar[str] = "Bundle"
    path: Path
    reference: Path | None = None

    @property
    def manifest(self) -> dict[str, Any]:
        return json.loads((self.path / "manifest.json").read_text())

    def save(self, directory: Path) -> None:
        shutil.copytree(self.path, directory / "bundle")
        if self.reference is not None:
            shutil.copyfile(self.reference, directory / "reference.onnx")

    @classmethod
    def load(cls, directory: Path) -> "Bundle":
        reference = directory / "reference.onnx"
        return cls(path=directory / "bundle", reference=reference if reference.exists() else None)


def artifact_class_path(cls: type[Artifact]) -> str:
    """``module:QualName`` of an artifact class, as stored in ``run.json``."""
    return f"{cls.__module__}:{cls.__qualname__}"


def import_artifact_class(path: str) -> type[Artifact]:
    """Inverse of :func:`artifact_class_path`."""
    module, _, name = path.partition(":")
    cls = getattr(importlib.import_module(module), name)
    if not (isinstance(cls, type) and issubclass(cls, Artifact)):
        raise TypeError(f"{path} is not an Artifact class")
    return cls
