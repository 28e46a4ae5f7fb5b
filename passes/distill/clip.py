"""``distill.clip-matryoshka`` (TinyVLM): a CLIP-style teacher into a tiny student with Matryoshka embeddings.

The student gets a Matryoshka head (``Linear(embed_dim -> max(dims))``) and trains with it, so
that at every nested width ``d`` its embedding carries the teacher's image embedding:
``1 - cos(W[:, :d] @ h[:d], t)`` averaged over ``dims``, where ``t`` is the teacher's (cached)
embedding of the clean image and ``W`` one shared, nested linear map into the teacher's space
(a training aid, dropped after the pass).  See :mod:`distillc.passes.distill.matryoshka`.

Class embeddings are decoupled from the student (``class_embeddings``):

- ``"text"``: the teacher's text tower encodes ``classes`` filled into ``prompts`` (tokenized by
  the teacher's tokenizer, prompt ensembles: :mod:`distillc.passes.distill.prompts`), or the
  token ids in ``text_tokens`` (a ``.npy`` of shape ``(classes, context_length)``);
- ``"file"``: precomputed teacher-space embeddings, ``(classes, D)``, from ``.npy`` or
  ``.safetensors``;
- ``"prototypes"``: mean normalized student embeddings of ``shots`` labelled images per class.

Teacher-space class embeddings ``t_c`` enter the student's space through the same nested map:
``e_c = W^T t_c / |t_c|``.  Then ``h[:d] . e_c[:d] = (W[:, :d] h[:d]) . t_c / |t_c|``, so
ranking classes by that dot product in the student's space ranks them exactly as the teacher's
cosine ranks the mapped embedding, at every ``d``, with one ``(classes, max(dims))`` matrix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, PrivateAttr, ValidationInfo, model_validator

from distillc import hookimpl
from distillc.errors import PassError
from distillc.pass_api import PassContext
from distillc.passes.distill.matryoshka import ClassEmbeddings, MatryoshkaConfig, MatryoshkaObjective, MatryoshkaPass
from distillc.passes.distill.prompts import encode_classes
from distillc.spec import LaxPath


class ClipMatryoshka(MatryoshkaPass):
    name = "distill.clip-matryoshka"
    version = "3"  # 2: the content of text_tokens / embeddings_file is part of the cache key; 3: classes + prompts
    description = "TinyVLM: match a CLIP-style teacher's embedding at every Matryoshka dim; text/file/prototype classes"
    center_targets = False  # text and file class embeddings live in the teacher's own (uncentered) space

    class Config(MatryoshkaConfig):
        teacher: str = Field(description="a [[teachers]] entry (a CLIP teacher for text class embeddings)")
        train_backbone: bool = Field(True, description="train the student with the head (else only the head trains)")
        augment: float = Field(0.3, ge=0.0, le=1.0, description="strength of the student's view augmentation")
        class_embeddings: Literal["text", "file", "prototypes"] = Field(
            "prototypes", description="where class embeddings come from")
        text_tokens: LaxPath | None = Field(None, description="class_embeddings = 'text': .npy of token ids "
                                                              "(classes, context_length)")
        embeddings_file: LaxPath | None = Field(None, description="class_embeddings = 'file': .npy or .safetensors "
                                                                  "of teacher-space embeddings (classes, D)")
        # sha256 of each class-embedding file given, read when the spec is validated (see
        # ClipMatryoshka.linked_key): its content, not its path, decides what the pass makes.
        _file_sha256: dict[str, str] = PrivateAttr(default_factory=dict)
        # Where each file given lies, resolved against the spec's folder when the spec is validated
        # (the pass never sees the spec; the file's content hash is what is in the key).
        _file_path: dict[str, Path] = PrivateAttr(default_factory=dict)

        @model_validator(mode="after")
        def _source_files(self) -> "ClipMatryoshka.Config":
            for key, source in (("text_tokens", "text"), ("classes", "text"), ("embeddings_file", "file")):
                if getattr(self, key) is not None and self.class_embeddings != source:
                    raise ValueError(f"{key} is only read with class_embeddings = {source!r} "
                                     f"(this pass has {self.class_embeddings!r})")
            if self.class_embeddings == "text" and self.text_tokens is None and self.classes is None:
                raise ValueError("class_embeddings = 'text' needs text_tokens (token ids) or classes (names the "
                                 "teacher's tokenizer encodes)")
            if self.text_tokens is not None and self.classes is not None:
                raise ValueError("give text_tokens or classes, not both")
            if self.class_embeddings == "file" and self.embeddings_file is None:
                raise ValueError("class_embeddings = 'file' needs embeddings_file")
            return self

        @model_validator(mode="after")
        def _hash_files(self, info: ValidationInfo) -> "ClipMatryoshka.Config":
            """Hash the class-embedding file, resolved like the spec resolves paths (relative to its
            folder, given as the validation context's ``spec_root``).  A path that is missing, a
            folder, a device or unreadable is refused here, as the spec's own paths are."""
            from distillc.cache import file_sha256
            from distillc.spec import path_problem

            root = (info.context or {}).get("spec_root")
            for key in ("text_tokens", "embeddings_file"):
                given = getattr(self, key)
                if root is not None and given is not None:
                    problem = path_problem(Path(root), given)
                    if problem:
                        raise ValueError(f"{key}: {problem}")
                    self._file_path[key] = (Path(root) / given).resolve()
                    self._file_sha256[key] = file_sha256(self._file_path[key])
            return self

    def linked_key(self) -> dict[str, Any]:
        """The class-embedding file's sha256 joins the cache key (its path is in the config), so
        rewriting the file in place reruns the pass."""
        hashes = self.config._file_sha256
        return {**super().linked_key(), **({"file_sha256": dict(hashes)} if hashes else {})}

    def class_embeddings(self, ctx: PassContext, model: Any,
                         objective: MatryoshkaObjective) -> tuple[ClassEmbeddings | None, dict[str, Any]]:
        cfg = self.config
        if cfg.class_embeddings == "prototypes":
            return super().class_embeddings(ctx, model, objective)
        if cfg.class_embeddings == "text" and cfg.classes is not None:
            teacher_space = encode_classes(ctx, cfg.teacher, cfg.class_names(), cfg.prompt_templates(),
                                           pass_name=self.name)
        elif cfg.class_embeddings == "text":
            teacher_space = self._text_embeddings(ctx)
        else:
            teacher_space = self._file_embeddings(ctx)
        return self.teacher_space_classes(ctx, objective, teacher_space, source=cfg.class_embeddings)

    # -- class embedding sources ----------------------------------------------------------------------

    def _file(self, ctx: PassContext, key: str) -> Path:
        given = getattr(self.config, key)
        path = self.config._file_path.get(key) or (Path(given).resolve() if given is not None else None)
        if path is None or not path.is_file():
            raise PassError(self.name, f"{key}: file not found: {str(given)!r} (looked at {path})")
        return path

    def _text_embeddings(self, ctx: PassContext) -> Any:
        import numpy as np
        import torch

        path = self._file(ctx, "text_tokens")
        teacher = ctx.teachers[self.config.teacher].build(ctx.plugins)
        if not getattr(teacher, "has_text_tower", False) or not hasattr(teacher, "encode_text"):
            raise PassError(self.name, f"teacher {self.config.teacher!r} has no text tower; use class_embeddings = "
                                       "'file' (precomputed text embeddings) or 'prototypes'")
        tokens = _read_array(path, self.name, "text_tokens")
        context = getattr(teacher, "context_length", tokens.shape[-1])
        if tokens.ndim != 2 or tokens.shape[1] != context or not np.issubdtype(tokens.dtype, np.integer):
            raise PassError(self.name, f"text_tokens: expected integer token ids of shape (classes, {context}), got "
                                       f"{tokens.dtype} {tuple(tokens.shape)}")
        if tokens.min() < 0 or tokens.max() >= getattr(teacher, "vocab_size", tokens.max() + 1):
            raise PassError(self.name, f"text_tokens: ids must be in 0..{teacher.vocab_size - 1}")
        with torch.no_grad():
            return teacher.encode_text(torch.from_numpy(tokens.astype(np.int64))).float().numpy()

    def _file_embeddings(self, ctx: PassContext) -> Any:
        import numpy as np

        embeddings = _read_array(self._file(ctx, "embeddings_file"), self.name, "embeddings_file")
        if not np.issubdtype(embeddings.dtype, np.floating):
            raise PassError(self.name, f"embeddings_file: expected float embeddings, got {embeddings.dtype}")
        return embeddings.astype(np.float32)


def _read_array(path: Path, pass_name: str, key: str) -> Any:
    """One array from ``.npy`` (no pickle) or ``.safetensors`` (its only tensor, or ``embeddings``)."""
    import numpy as np

    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            return np.load(path, allow_pickle=False)
        if suffix == ".safetensors":
            from safetensors.numpy import load_file

            tensors = load_file(str(path))
            if len(tensors) == 1:
                return next(iter(tensors.values()))
            if "embeddings" in tensors:
                return tensors["embeddings"]
            raise PassError(pass_name, f"{key}: {path.name} holds {sorted(tensors)}; give one tensor or one named "
                                       "'embeddings'")
    except (OSError, ValueError) as exc:
        raise PassError(pass_name, f"{key}: cannot read {path}: {exc}") from None
    raise PassError(pass_name, f"{key}: {path.name} is not .npy or .safetensors")


@hookimpl
def distillc_register_passes(registry: Any) -> None:
    registry.add(ClipMatryoshka)
