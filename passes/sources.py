"""Source passes: where the teachers and the student come from.

distillc adds these to every plan itself (they cannot be listed in ``[[passes]]``):
``teacher.train`` / ``teacher.load`` for each ``[[teachers]]`` entry, then ``student.init`` or
``student.onnx`` for ``[student]``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from pydantic import Field

from distillc import hookimpl
from distillc.artifacts import OnnxModel, TorchModel
from distillc.errors import PassError, SpecError
from distillc.pass_api import Pass, PassConfig, PassContext, PassResult


class _ArchConfig(PassConfig):
    arch: str
    options: dict[str, Any] = {}
    image_size: int
    channels: int


class _TeacherConfig(_ArchConfig):
    # The teacher's input contract (distillc.spec.teacher_input) when it is not the data as it
    # is; then image_size/channels are the contract's.  Left out of the key when None, so a
    # teacher fed the plain data keeps the key it had before contracts existed.
    input: dict[str, Any] | None = Field(None, exclude_if=lambda value: value is None)
    # The teacher entry's tokenizer file: its path is not in the key, its content hash is (left out
    # when there is none, so a teacher without one keeps its key).
    tokenizer: str | None = Field(None, exclude=True)
    tokenizer_sha256: str | None = Field(None, exclude_if=lambda value: value is None)


def _with_tokenizer(meta: dict[str, Any], model: Any, cfg: Any, teacher: str) -> dict[str, Any]:
    """``meta`` with the teacher's tokenizer (``meta["tokenizer"]``, its whole content: the artifact
    carries it to the passes that encode text), after checking it fits the text tower."""
    if cfg.tokenizer is None:
        return meta
    from distillc.plugins.models.clip_tokenizer import ClipTokenizer, check_fits

    tokenizer = ClipTokenizer.from_file(cfg.tokenizer)
    check_fits(tokenizer, model, teacher=teacher)
    return {**meta, "tokenizer": tokenizer.to_meta()}


def _teacher_meta(model: Any, contract: dict[str, Any] | None, params: int) -> dict[str, Any]:
    meta: dict[str, Any] = {"embed_dim": model.embed_dim, "params": params}
    if getattr(model, "grid", None) is not None:  # the patch-token grid, reported by the passes it teaches
        meta["grid"] = int(model.grid)
    if contract is not None:
        meta["input"] = contract
    return meta


class TeacherTrain(Pass):
    """Train a teacher with labels (for demos and tests, where no pretrained weights exist)."""

    name = "teacher.train"
    description = "train a teacher on the labelled data (demos/tests; real teachers are loaded)"
    takes = None
    makes = TorchModel
    uses_data = True
    tools = ("torch",)
    distributed = True

    class Config(_TeacherConfig):
        epochs: int = Field(ge=1)
        lr: float = 1e-3
        batch_size: int = 128
        weight_decay: float = 0.05
        # ``[[teachers]] train.data``: the teacher's own labelled data (the [data] keys but path),
        # its location (not in the key) and its fingerprint (in the key).  None: the spec's [data].
        data: dict[str, Any] | None = Field(None, exclude_if=lambda value: value is None)
        data_path: str | None = Field(None, exclude=True)
        data_fingerprint: str | None = Field(None, exclude_if=lambda value: value is None)

    def run(self, artifact: None, ctx: PassContext) -> PassResult:
        import torch
        import torch.nn.functional as F

        from distillc.plugins.augment import Augment
        from distillc.training import (DataParallel, autocast, batches, count_params, embed_all, epoch_generator,
                                       pick_device, prepare, run_epochs)

        cfg = self.config
        data = ctx.data if cfg.data is None else _own_data(ctx, cfg)
        if not data.labelled:
            where = "its train.data" if cfg.data is not None else "[data]"
            raise PassError(self.name, f"teacher.train needs labelled data; {data.name} ({where}) has no labels"
                            + ("" if cfg.data is not None else "; give the teacher labelled data of its own in train.data "
                               "(e.g. train = { ..., data = { source = \"sklearn-digits\" } })"))
        torch.manual_seed(ctx.seed)
        options = {"image_size": cfg.image_size, "in_chans": cfg.channels, **cfg.options}
        device = pick_device()
        from distillc.plugins.models.teacher_input import with_input

        bare = ctx.plugins.teachers.get(cfg.arch)(**options)
        model = prepare(with_input(bare, cfg.input), device)  # trained on its own input, as it will be used
        head = torch.nn.Linear(model.embed_dim, data.num_classes).to(device)
        parallel = DataParallel({"model": model, "head": head}, device)
        params = list(model.parameters()) + list(head.parameters())
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        steps_per_epoch = math.ceil(len(data.train_x) / cfg.batch_size)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch,
                                                       pct_start=0.15)
        augment = Augment(strength=0.3, flip=False)

        def classify_loss(x: Any, y: Any) -> Any:
            return F.cross_entropy(head(model.embed(x)), y)

        def epoch_fn(epoch: int) -> tuple[float, int]:
            gen = epoch_generator(ctx.seed, epoch)
            draws = parallel.generator(ctx.seed, epoch, gen)
            model.train()
            total, seen = 0.0, 0
            for idx in batches(len(data.train_x), cfg.batch_size, gen):
                part = parallel.share(idx)
                if part is None:
                    continue
                x = augment(data.train_x[part], draws).to(device)
                y = data.train_y[part].to(device)
                with autocast(device):
                    loss = parallel.loss(classify_loss, x, y)
                optimizer.zero_grad(set_to_none=True)
                parallel.backward(loss, part, idx)
                optimizer.step()
                schedule.step()
                total += loss.item() * len(part)
                seen += len(part)
            return parallel.epoch_mean(total, seen)

        losses = run_epochs(progress=ctx.progress, checkpoint_dir=ctx.checkpoint_dir, description=f"train {ctx.step_id}",
                            epochs=cfg.epochs, state={"model": model, "head": head, "optimizer": optimizer,
                                                      "schedule": schedule}, epoch_fn=epoch_fn, step=ctx.step_id)
        with torch.no_grad():
            features = embed_all(model, data.val_x, fn=lambda m, b: m.embed(b))
            val_top1 = float((head.cpu()(features).argmax(1) == data.val_y).float().mean())
        out = TorchModel.from_module(bare, role="teacher", arch=cfg.arch, options=options,
                                     meta=_with_tokenizer(_teacher_meta(bare, cfg.input, count_params(bare)), bare,
                                                          cfg, ctx.step_id.removeprefix("teacher:")))
        return PassResult(out, {"loss": losses[-1], "epoch_losses": losses, "supervised_val_top1": val_top1,
                                "params": count_params(bare)})


def _own_data(ctx: PassContext, cfg: Any) -> Any:
    """A teacher's own training data (``[[teachers]] train.data``), loaded from its source."""
    from distillc.spec import DataSection, data_kwargs

    section = DataSection.model_validate(cfg.data)
    source = ctx.plugins.datasets.get(section.source)
    path = Path(cfg.data_path) if cfg.data_path is not None else None
    return source.load(**data_kwargs(section, seed=ctx.seed, path=path, source=source))


class TeacherLoad(Pass):
    """Load a teacher's weights from a local file (safetensors, or torch.load with weights_only)."""

    name = "teacher.load"
    description = "load a pretrained teacher from a local checkpoint (no download, no timm)"
    takes = None
    makes = TorchModel
    tools = ("torch",)

    class Config(_TeacherConfig):
        # The file's location is not part of the cache key (exclude=True), its content hash is:
        # moving a project or sharing a cache does not retrain anything.
        checkpoint: str = Field(exclude=True)
        sha256: str

    def run(self, artifact: None, ctx: PassContext) -> PassResult:
        from distillc.plugins.models.checkpoint import load_into, load_state_dict_file
        from distillc.training import count_params

        cfg = self.config
        options = {"image_size": cfg.image_size, "in_chans": cfg.channels, **cfg.options}
        model = ctx.plugins.teachers.get(cfg.arch)(**options)
        info = load_into(model, load_state_dict_file(cfg.checkpoint), source=cfg.checkpoint) or {}
        adapted = _notice_adaptations(ctx, info)
        out = TorchModel.from_module(model, role="teacher", arch=cfg.arch, options=options,
                                     meta=_with_tokenizer(_teacher_meta(model, cfg.input, count_params(model)),
                                                          model, cfg, ctx.step_id.removeprefix("teacher:")))
        return PassResult(out, {"params": count_params(model), **adapted,
                                **{k: v for k, v in info.items() if isinstance(v, (int, float, str))}})


class StudentInit(Pass):
    """Build the student (seeded initialisation), optionally loading trained weights."""

    name = "student.init"
    description = "build the [student] architecture, optionally from a checkpoint"
    takes = None
    makes = TorchModel
    tools = ("torch",)

    class Config(_ArchConfig):
        checkpoint: str | None = Field(None, exclude=True)
        checkpoint_sha256: str | None = None

    def run(self, artifact: None, ctx: PassContext) -> PassResult:
        import torch

        from distillc.training import count_params

        cfg = self.config
        torch.manual_seed(ctx.seed)
        options = {"image_size": cfg.image_size, "in_chans": cfg.channels, **cfg.options}
        model = ctx.plugins.students.get(cfg.arch)(**options)
        if cfg.checkpoint:
            from distillc.plugins.models.checkpoint import load_into, load_state_dict_file

            adapted = _notice_adaptations(ctx, load_into(model, load_state_dict_file(cfg.checkpoint),
                                                         source=cfg.checkpoint) or {})
        else:
            adapted = {}
        params = count_params(model)
        out = TorchModel.from_module(model, role="student", arch=cfg.arch, options=options,
                                     meta={"embed_dim": model.embed_dim, "params": params})
        return PassResult(out, {"params": params, "embed_dim": model.embed_dim, **adapted})


class StudentOnnx(Pass):
    """Take a student that was made elsewhere as an ONNX file (float or QCDQ)."""

    name = "student.onnx"
    description = "use an existing ONNX model as the student (skips the torch passes)"
    takes = None
    makes = OnnxModel
    tools = ("onnx",)

    class Config(PassConfig):
        path: str = Field(exclude=True)
        sha256: str
        # The spec's [data] images (channels, height, width), filled in by the planner when the spec
        # has a [data] section; only checked against the model (link), so not in the key.
        data_shape: list[int] | None = Field(None, exclude=True)

    def link(self, upstream: Any, source: str) -> None:
        """A spec that gives [data] must give images the model takes: the validation images are
        its example and verification inputs.  (With no [data] the backend uses random inputs.)"""
        given = self.config.data_shape
        model = _onnx_input_dims(self.config.path)
        if given is None or model is None or _fits(model, given):
            return
        channels, size = given[0], given[1]
        wanted = "x".join(str(d) for d in model[1:])
        if len(model) == 4 and isinstance(model[1], int) and isinstance(model[2], int) and model[2] == model[3]:
            fix = f"set data.channels = {model[1]} and data.image_size = {model[2]}, or leave [data] out"
        else:  # [data] images are square: channels x image_size x image_size
            fix = "no [data] images fit it; leave [data] out"
        raise SpecError(f"{source}.onnx: {Path(self.config.path).name} takes {wanted} inputs, but [data] gives "
                        f"{channels}x{size}x{size} images (data.channels = {channels}, data.image_size = {size}): "
                        f"{fix} to verify with random inputs")

    def run(self, artifact: None, ctx: PassContext) -> PassResult:
        import onnx

        try:
            model = onnx.load(self.config.path)
            onnx.checker.check_model(model)
        except Exception as exc:
            raise PassError(self.name, f"{self.config.path} is not a valid ONNX model: {exc}") from None
        return PassResult(OnnxModel(path=Path(self.config.path), meta={"source": self.config.path}),
                          {"nodes": len(model.graph.node)})


def _onnx_input_dims(path: str) -> list[int | str] | None:
    """The first graph input's dims (an int, or the name of a symbolic dim); None if unreadable
    (the run reports that)."""
    try:
        import onnx

        graph = onnx.load(path, load_external_data=False).graph
        weights = {t.name for t in graph.initializer}
        first = next(i for i in graph.input if i.name not in weights)
        return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                for d in first.type.tensor_type.shape.dim]
    except Exception:
        return None


def _fits(model: list[int | str], image: list[int]) -> bool:
    """Whether images of shape ``image`` (C, H, W) fit a model input ``model`` (N, C, H, W; a
    symbolic dim fits anything)."""
    return len(model) == 4 and all(isinstance(m, str) or m == d for m, d in zip(model[1:], image))


def _notice_adaptations(ctx: PassContext, info: dict[str, Any]) -> dict[str, Any]:
    """Say what loading changed in the checkpoint's tensors (a 3-channel patch embedding summed for
    a 1-channel model, a resampled position grid, renamed keys): never silently.  Returns the
    ``adapted`` metric (the list), or nothing when the file loaded as it was."""
    adapted = [*info.get("resized", []), *info.get("renamed", [])]
    for change in adapted:
        ctx.progress.log(f"{ctx.step_id}: checkpoint adapted: {change}")
    return {"adapted": adapted} if adapted else {}


@hookimpl
def distillc_register_passes(registry: Any) -> None:
    for cls in (TeacherTrain, TeacherLoad, StudentInit, StudentOnnx):
        registry.add(cls)
