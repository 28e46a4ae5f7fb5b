"""``quantize.brevitas-qat``: quantization-aware training of the student with Brevitas.

Graph-mode quantization (BatchNorm folded into the convolutions), per-channel weights (8 bits,
or fewer), 8-bit activations, calibration on training images, then QAT epochs that keep a
label-free distillation objective: with ``teacher`` set, the frozen teacher keeps teaching
(cosine between the projected student embedding and the teacher's); without it, the quantized
student learns to reproduce its own FP32 embedding.  FP32 and INT8 linear-probe top-1 are
reported side by side when the data has labels.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from distillc import hookimpl
from distillc.artifacts import QuantTorchModel, TorchModel
from distillc.pass_api import Pass, PassConfig, PassContext, PassResult


class BrevitasQat(Pass):
    name = "quantize.brevitas-qat"
    version = "2"  # 2: projector starts from the least-squares fit
    description = "Brevitas QAT (BN folded, per-channel weights) keeping the distillation objective"
    takes = TorchModel
    makes = QuantTorchModel
    uses_data = True
    tools = ("torch", "brevitas")

    class Config(PassConfig):
        weight_bits: int = Field(8, ge=2, le=8, description="weight bit width (8, or 4 for half the flash)")
        act_bits: int = Field(8, ge=2, le=8, description="activation bit width")
        per_channel: bool = Field(True, description="one weight scale per output channel")
        calib_images: int = Field(256, ge=1, description="training images used to calibrate activation scales")
        epochs: int = Field(1, ge=0, le=100_000, description="QAT epochs; 0 = calibration only (PTQ)")
        lr: float = Field(1e-4, gt=0.0, le=1.0)
        batch_size: int = Field(128, ge=2)
        teacher: str | None = Field(None, description="a [[teachers]] entry that keeps teaching during QAT")
        augment: float = Field(0.0, ge=0.0, le=1.0, description="augmentation strength of the student's view")
        probe: bool = Field(True, description="report FP32 and INT8 linear-probe top-1 (labelled data)")

    def run(self, artifact: TorchModel, ctx: PassContext) -> PassResult:
        import torch
        import torch.nn.functional as F

        from distillc.passes.distill_base import teacher_targets
        from distillc.passes.distill_feature import projection_head
        from distillc.passes.eval_probe import linear_probe_top1
        from distillc.passes.int8.brevitas import quantize
        from distillc.plugins.augment import Augment
        from distillc.training import batches, embed_all, epoch_generator, run_epochs

        cfg = self.config
        data = ctx.data
        torch.manual_seed(ctx.seed)
        float_model = artifact.build(ctx.plugins)
        metrics: dict[str, Any] = {}
        if cfg.probe and data.labelled:
            metrics["fp32"] = {"top1": linear_probe_top1(float_model, data)}

        student_embeddings = embed_all(float_model, data.train_x)
        if cfg.teacher is not None:
            targets = teacher_targets(ctx, cfg.teacher, "embed", lambda m, b: m.embed(b))
        else:
            targets = student_embeddings
        targets = F.normalize(targets, dim=1)

        # Brevitas QAT runs on the CPU here: its fake-quant graph gains little from bf16 autocast.
        qmodel = quantize(float_model, data.train_x[: cfg.calib_images], weight_bits=cfg.weight_bits,
                          act_bits=cfg.act_bits, per_channel=cfg.per_channel)
        embed_dim = artifact.meta.get("embed_dim") or targets.shape[1]
        if cfg.teacher:
            # Start from the best linear map of the FP32 student onto the teacher (ridge least
            # squares): a random projector would send large, meaningless gradients into the
            # freshly quantized student in the first QAT steps.
            projector = projection_head(embed_dim, 0, targets.shape[1])
            fit_linear(projector, student_embeddings, targets)
        else:
            projector = torch.nn.Identity()
        params = list(qmodel.parameters()) + list(projector.parameters())
        optimizer = torch.optim.Adam(params, lr=cfg.lr)
        augment = Augment(strength=cfg.augment, flip=False)

        def epoch_fn(epoch: int) -> tuple[float, int]:
            gen = epoch_generator(ctx.seed, epoch)
            qmodel.train()
            total, seen = 0.0, 0
            for idx in batches(len(data.train_x), cfg.batch_size, gen, drop_last=True):
                z = projector(qmodel(augment(data.train_x[idx], gen)))
                loss = 1.0 - F.cosine_similarity(z, targets[idx], dim=1).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.item() * len(idx)
                seen += len(idx)
            return total / max(seen, 1), seen

        losses = run_epochs(progress=ctx.progress, checkpoint_dir=ctx.checkpoint_dir, description=ctx.step_id,
                            epochs=cfg.epochs, epoch_fn=epoch_fn,
                            state={"qmodel": qmodel, "projector": projector, "optimizer": optimizer})
        qmodel.eval()
        if losses:
            metrics["loss"] = losses[-1]
        if "fp32" in metrics:
            metrics["int8"] = {"top1": linear_probe_top1(qmodel, data)}
        quant = {"weight_bits": cfg.weight_bits, "act_bits": cfg.act_bits, "per_channel": cfg.per_channel}
        state = {k: v.detach().cpu().contiguous().clone() for k, v in qmodel.state_dict().items()}
        out = QuantTorchModel(role="student", arch=artifact.arch, options=artifact.options, state=state,
                              meta={**artifact.meta, "quant": quant}, head=artifact.head, quant=quant)
        return PassResult(out, metrics)


def fit_linear(layer: Any, x: Any, y: Any, ridge: float = 1e-3) -> None:
    """Set ``layer`` (nn.Linear) to the ridge least-squares map from ``x`` to ``y``."""
    import torch

    ones = torch.ones(len(x), 1, dtype=x.dtype)
    a = torch.cat([x, ones], dim=1).double()
    gram = a.T @ a + ridge * len(x) * torch.eye(a.shape[1], dtype=a.dtype)
    solution = torch.linalg.solve(gram, a.T @ y.double())
    with torch.no_grad():
        layer.weight.copy_(solution[:-1].T.to(layer.weight.dtype))
        layer.bias.copy_(solution[-1].to(layer.bias.dtype))


@hookimpl
def distillc_register_passes(registry: Any) -> None:
    registry.add(BrevitasQat)
