"""``eval.zero-shot``: top-1 per Matryoshka dimension with the model's own class embeddings.

The class embeddings are the INT8 rows stored by ``matryoshka`` or ``distill.clip-matryoshka``
in ``meta["matryoshka"]``, exactly what the bundle will hold in flash.  Each validation image is
embedded, its first ``d`` values are scored against every class's first ``d`` values, and the
best class is its prediction.  The model passes through unchanged (float or quantized), so the
pass can sit after QAT and show what quantization cost per dimension.

The quality gate (``gate.py``) fails the compile when the validation embeddings are constant or
the best dimension's top-1 is at chance (``gate = "off"`` turns that off); ``min_top1`` holds
for every scored dimension, and ``max_drop`` (a quantized model) compares each with the FP32
zero-shot top-1 ``quantize.brevitas-qat`` recorded with the model's own class embeddings.

With ``classes`` (and ``prompts``) it scores other class embeddings instead: the names are encoded
by ``teacher``'s text tower (:mod:`distillc.passes.distill.prompts`) and brought into the head's
space through the nested map the Matryoshka pass kept with teacher-space class embeddings
(``meta["matryoshka"]["teacher_map"]``), then quantized to INT8 as the bundle's would be.  The
bundle keeps the class embeddings it has: this measures other names or prompts.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from distillc import hookimpl
from distillc.artifacts import QuantTorchModel, TorchModel
from distillc.errors import PassError
from distillc.pass_api import Pass, PassContext, PassResult
from distillc.passes.eval.gate import GateConfig, check_embeddings, check_top1
from distillc.passes.distill.prompts import ClassPromptsConfig, encode_classes, teacher_tokenizer_requirement


class ZeroShotEval(Pass):
    name = "eval.zero-shot"
    description = "zero-shot top-1 per Matryoshka dim with the model's INT8 class embeddings"
    takes = (TorchModel, QuantTorchModel)
    makes = TorchModel
    passthrough = True
    uses_data = True
    tools = ("torch",)
    version = "2"  # 2: the quality gate

    class Config(ClassPromptsConfig, GateConfig):
        dims: list[int] | None = Field(None, description="dims to score (a subset of the model's); default all")
        teacher: str | None = Field(None, description="with classes: the [[teachers]] entry whose text tower encodes "
                                                      "them (the one the Matryoshka head was trained against)")

        @model_validator(mode="after")
        def _classes_with_teacher(self) -> "ZeroShotEval.Config":
            if (self.classes is None) != (self.teacher is None):
                raise ValueError("classes and teacher go together: the teacher's text tower encodes the classes"
                                 if self.classes is not None else "teacher is only read with classes")
            return self

    def teacher_requirements(self) -> dict[str, tuple[str, str]]:
        return teacher_tokenizer_requirement(self.config)

    def linked_key(self) -> dict[str, Any]:
        return self.config.classes_key()

    def run(self, artifact: TorchModel, ctx: PassContext) -> PassResult:
        from distillc.passes.distill.matryoshka import ClassEmbeddings, zero_shot_top1

        info = artifact.meta.get("matryoshka")
        if not info:
            raise PassError(self.name, "the model has no Matryoshka class embeddings; run 'matryoshka' or "
                                       "'distill.clip-matryoshka' (with labelled data or class embeddings) before it")
        classes = ClassEmbeddings.from_meta(info)
        if self.config.classes is not None:
            classes = self._prompted_classes(ctx, classes)
        dims = list(self.config.dims) if self.config.dims is not None else classes.dims
        unknown = [d for d in dims if d not in classes.dims]
        if unknown:
            raise PassError(self.name, f"dims {unknown} are not among the model's Matryoshka dims {classes.dims}")
        data = ctx.data
        if not data.labelled:
            raise PassError(self.name, f"zero-shot accuracy needs labelled validation data; {data.name} has none")
        model = artifact.build(ctx.plugins)
        top1 = zero_shot_top1(model, data, classes, dims, self.name)
        quantized = isinstance(artifact, QuantTorchModel)
        gate = self._gate(artifact, model, data, top1, dims, quantized, own_classes=self.config.classes is None)
        return PassResult(artifact, {"top1": top1, "classes": len(classes.classes), "class_embeddings": classes.source,
                                     "quantized": quantized, "gate": gate})

    def _gate(self, artifact: TorchModel, model: Any, data: Any, top1: dict[str, float], dims: list[int], quantized: bool,
              own_classes: bool) -> dict[str, Any]:
        """The quality gate: constant embeddings, the best dim at chance, ``min_top1`` at every dim,
        ``max_drop`` against the FP32 zero-shot top-1 QAT recorded (with the model's own class embeddings)."""
        from distillc.training import embed_all

        cfg = self.config
        what = "the INT8 student" if quantized else "the student"
        gate = check_embeddings(self.name, cfg, embed_all(model, data.val_x).numpy(), what=what)
        reference = artifact.meta.get("fp32_zero_shot_top1", {}) if quantized and own_classes else {}
        best = max(dims, key=lambda d: top1[str(d)]) if dims else None
        drops = {}
        for d in dims:
            checked = check_top1(self.name, cfg, top1[str(d)], data.val_y, data.num_classes, metric=f"top1.{d}",
                                 what=what, reference=reference.get(str(d)), chance_test=d == best,
                                 reference_metric="the FP32 zero-shot top-1 quantize.brevitas-qat recorded: a quantized "
                                                  "model, labelled data, the model's own class embeddings")
            if "drop_points" in checked:
                drops[str(d)] = checked.pop("drop_points")
            gate.update(checked)
        if drops:
            gate["drop_points"] = drops
        return gate

    def _prompted_classes(self, ctx: PassContext, stored: Any) -> Any:
        """INT8 class embeddings of ``classes`` in the head's space, through the stored nested map."""
        from distillc.passes.distill.matryoshka import ClassEmbeddings, decode_teacher_map

        cfg = self.config
        mapping = stored.teacher_map
        if mapping is None:
            raise PassError(self.name, "classes: the model's Matryoshka head keeps no map into a teacher's space; "
                                       "train it with teacher-space class embeddings (distill.clip-matryoshka, or "
                                       "matryoshka with classes)")
        if mapping.get("teacher_key") != ctx.teacher_keys.get(cfg.teacher):
            raise PassError(self.name, f"teacher: the Matryoshka head was trained against teacher "
                                       f"{mapping.get('teacher')!r}, not this {cfg.teacher!r}; give that teacher")
        nested_map = decode_teacher_map(mapping)
        teacher_space = encode_classes(ctx, cfg.teacher, cfg.class_names(), cfg.prompt_templates(),
                                       pass_name=self.name)
        if teacher_space.shape[1] != nested_map.shape[0]:
            raise PassError(self.name, f"teacher {cfg.teacher!r} embeds text in {teacher_space.shape[1]} values, the "
                                       f"head's map takes {nested_map.shape[0]}")
        return ClassEmbeddings.quantize(teacher_space @ nested_map, dims=stored.dims, classes=cfg.class_names(),
                                        metric="dot", source="text")


@hookimpl
def distillc_register_passes(registry: Any) -> None:
    registry.add(ZeroShotEval)
