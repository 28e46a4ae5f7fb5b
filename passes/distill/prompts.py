"""Class names and prompt templates -> class embeddings from a CLIP teacher's text tower.

The passes that score classes in a teacher's space (``matryoshka``, ``distill.clip-matryoshka``,
``eval.zero-shot``) share these keys:

- ``classes``: the class names, a list or a UTF-8 file with one name a line (blank lines
  ignored; a relative path is relative to the spec's folder). Label ``i`` is name ``i``.
- ``prompts``: templates with one ``{}`` for the name (default ``["a photo of a {}."]``).

Each class's embedding is CLIP's prompt ensemble: every prompt with the name filled in is
tokenized by the teacher's tokenizer (its ``[[teachers]]`` entry's ``tokenizer``, carried in the
teacher artifact's ``meta["tokenizer"]``), encoded by the text tower, L2-normalised; the mean over
prompts is normalised again.  The names and prompts are in the pass's config (a names file by its
sha256), and the tokenizer's hash is in the teacher's key, so all three are in the pass's key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, PrivateAttr, ValidationInfo, field_validator, model_validator

from distillc.errors import PassError
from distillc.pass_api import PassConfig, PassContext
from distillc.spec import LaxPath

DEFAULT_PROMPTS = ("a photo of a {}.",)
MAX_CLASSES = 10_000
MAX_NAME_CHARS = 1_000
MAX_CLASS_FILE_BYTES = 16 * 2**20
#: Texts the text tower encodes at once.
TEXT_BATCH = 256


def check_prompts(prompts: list[str] | None) -> list[str] | None:
    """``prompts`` if each is a template with exactly one ``{}`` and not over-long."""
    for prompt in prompts or []:
        if prompt.count("{}") != 1:
            raise ValueError(f"each prompt needs exactly one '{{}}' for the class name (got {prompt[:80]!r})")
        if len(prompt) > MAX_NAME_CHARS:
            raise ValueError(f"a prompt of {len(prompt)} characters; at most {MAX_NAME_CHARS}")
    return prompts


class ClassPromptsConfig(PassConfig):
    """``classes`` and ``prompts``; a pass that has them also needs a teacher with a tokenizer."""

    classes: list[str] | LaxPath | None = Field(
        None, description="class names (label i is name i): a list, or a UTF-8 file with one name a line")
    prompts: list[str] | None = Field(
        None, min_length=1, max_length=256,
        description="prompt templates with one '{}' for the class name, averaged per class "
                    "(default [\"a photo of a {}.\"])")
    # The names, when `classes` is a file: read when the spec is validated (relative to its folder).
    _class_names: list[str] | None = PrivateAttr(None)
    _classes_sha256: str | None = PrivateAttr(None)

    @field_validator("classes")
    @classmethod
    def _names(cls, classes: Any) -> Any:
        if isinstance(classes, list):
            _check_names(classes)
        return classes

    @field_validator("prompts")
    @classmethod
    def _templates(cls, prompts: list[str] | None) -> list[str] | None:
        return check_prompts(prompts)

    @model_validator(mode="after")
    def _read_class_file(self, info: ValidationInfo) -> "ClassPromptsConfig":
        if self.prompts is not None and self.classes is None:
            raise ValueError("prompts are only read with classes (the class names they are filled with)")
        root = (info.context or {}).get("spec_root")
        if isinstance(self.classes, Path) and root is not None:
            try:
                self._class_names, self._classes_sha256 = read_class_file(Path(root), self.classes)
            except ValueError as exc:
                raise ValueError(f"classes: {exc}") from None
        return self

    def class_names(self) -> list[str] | None:
        """The class names, or None without ``classes``."""
        if self.classes is None:
            return None
        if isinstance(self.classes, list):
            return list(self.classes)
        if self._class_names is None:  # built outside a spec: relative to the working folder
            self._class_names, self._classes_sha256 = read_class_file(Path.cwd(), self.classes)
        return list(self._class_names)

    def prompt_templates(self) -> list[str]:
        return list(self.prompts) if self.prompts is not None else list(DEFAULT_PROMPTS)

    def classes_key(self) -> dict[str, Any]:
        """What joins the cache key beyond the config: the names file's sha256 (its path is in the config)."""
        if isinstance(self.classes, Path):
            self.class_names()
            return {"classes_sha256": self._classes_sha256}
        return {}


def _check_names(names: list[str]) -> None:
    if not names:
        raise ValueError("give at least one class name")
    if len(names) > MAX_CLASSES:
        raise ValueError(f"{len(names)} class names; at most {MAX_CLASSES}")
    for name in names:
        if not name.strip():
            raise ValueError("a class name is empty")
        if len(name) > MAX_NAME_CHARS:
            raise ValueError(f"a class name of {len(name)} characters; at most {MAX_NAME_CHARS}")


def read_class_file(root: Path, given: Path) -> tuple[list[str], str]:
    """The names in a class file (one a line, blank lines ignored, UTF-8) and its sha256.

    Raises ValueError (a spec problem under the ``classes`` key) for a path that is missing or no
    readable regular file, a file that is not UTF-8, too large, or holds no name.
    """
    import hashlib

    from distillc.spec import path_problem

    problem = path_problem(root, given)
    if problem:
        raise ValueError(problem)
    path = (root / given).resolve()
    with open(path, "rb") as f:
        raw = f.read(MAX_CLASS_FILE_BYTES + 1)
    if len(raw) > MAX_CLASS_FILE_BYTES:
        raise ValueError(f"{path} is larger than {MAX_CLASS_FILE_BYTES // 2**20} MiB; a class file holds one name a line")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 text (byte {exc.start})") from None
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise ValueError(f"{path} holds no class name (one name a line)")
    _check_names(names)
    return names, hashlib.sha256(raw).hexdigest()


def teacher_tokenizer_requirement(config: Any) -> dict[str, tuple[str, str]]:
    """``Pass.teacher_requirements`` of a config with ``classes`` and a ``teacher``."""
    if getattr(config, "classes", None) is not None and isinstance(getattr(config, "teacher", None), str):
        return {"classes": (config.teacher, "tokenizer")}
    return {}


def encode_classes(ctx: PassContext, teacher: str, names: list[str], prompts: list[str], *,
                   pass_name: str) -> Any:
    """Teacher-space class embeddings ``(classes, D)`` (float32, unit rows): each class's prompts
    encoded by ``teacher``'s text tower, normalised, averaged, normalised again."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from distillc.errors import DistillcError
    from distillc.plugins.models.clip_tokenizer import ClipTokenizer, check_fits

    artifact = ctx.teachers[teacher]
    info = artifact.meta.get("tokenizer")
    if info is None:
        raise PassError(pass_name, f"classes: teacher {teacher!r} has no tokenizer; give its [[teachers]] entry "
                                   "tokenizer = \"...\" (a tokenizer.json or OpenAI's bpe_simple_vocab_16e6.txt.gz)")
    model = artifact.build(ctx.plugins)
    try:
        tokenizer = ClipTokenizer.from_content(info)
        check_fits(tokenizer, model, teacher=teacher)
        texts = [prompt.replace("{}", name) for name in names for prompt in prompts]
        ids = torch.from_numpy(tokenizer.tokenize(texts, int(model.context_length)))
        with torch.no_grad():
            parts = [model.encode_text(ids[i:i + TEXT_BATCH], eot_id=tokenizer.eot_id).float()
                     for i in range(0, len(ids), TEXT_BATCH)]
    except DistillcError as exc:
        raise PassError(pass_name, f"classes: {exc}") from None
    embeddings = F.normalize(torch.cat(parts), dim=-1).reshape(len(names), len(prompts), -1)
    ensemble = F.normalize(embeddings.mean(dim=1), dim=-1)
    ctx.log(f"{len(names)} class embeddings from {len(prompts)} prompt(s) through {teacher!r}'s text tower")
    return ensemble.numpy().astype(np.float32)
