"""Epoch time of a distillation pass with the teacher-target cache cold and warm, against a naive loop.

    .venv/bin/python benchmarks/distill.py [--method ca-dssl|bootleg] [--epochs 4] [--image-size 32]
                                           [--teacher vit_small_patch4] [--teacher-depth 12] [--batch-size 256]

Runs the method on scikit-learn's digits three ways, with the same teacher (random weights: speed
does not depend on them), the same student, batch size, optimizer and precision:

- the distillc pass with an empty cache (the teacher computes its targets once per view),
- the distillc pass again (``--force``): the teacher's targets come from the cache,
- a naive PyTorch loop of the same method that runs the teacher on every batch.

Prints seconds per epoch for each and the speed-ups.  Uses a temporary work directory and cache.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import textwrap
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from distillc.run import compile_spec
from distillc.plugin_manager import load_plugins
from distillc.progress import ProgressReporter

PASS_NAMES = {"ca-dssl": "distill.ca-dssl", "bootleg": "distill.bootleg"}

SPEC = """
[distillc]
spec_version = 1
name = "bench-distill"
seed = 0

[data]
source = "sklearn-digits"
image_size = {image_size}
channels = 1

[[teachers]]
name = "teacher"
arch = "{teacher}"
depth = {depth}
checkpoint = "teacher.safetensors"

[student]
arch = "mobilenetv2"
width = {width}

[[passes]]
use = "{pass_name}"
teacher = "teacher"
epochs = {epochs}
batch_size = {batch_size}
{options}
"""

METHOD_OPTIONS = {"ca-dssl": "teacher_views = {views}", "bootleg": "blocks = {blocks}"}


class EpochTimer(ProgressReporter):
    """Records when each epoch of each progress task ended."""

    def __init__(self) -> None:
        self.marks: dict[str, list[float]] = {}

    @contextmanager
    def task(self, description, total, unit="step"):
        self.marks[description] = [time.perf_counter()]
        with super().task(description, total, unit) as handle:
            yield handle

    def _show(self, handle, steps):
        self.marks[handle.description].append(time.perf_counter())

    def epoch_seconds(self, description: str) -> list[float]:
        marks = self.marks[description]
        return [b - a for a, b in zip(marks, marks[1:])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=sorted(PASS_NAMES), default="ca-dssl")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--teacher", default="vit_small_patch4", help="a vit_* teacher architecture")
    parser.add_argument("--teacher-depth", type=int, default=12)
    parser.add_argument("--width", type=float, default=0.35, help="MobileNetV2 student width")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--views", type=int, default=2, help="ca-dssl: cached weak views per image")
    parser.add_argument("--blocks", default="[-2, -1]", help="bootleg: teacher blocks (a TOML list)")
    args = parser.parse_args()
    os.environ.setdefault("DISTILLC_DISABLE_PLUGIN_AUTOLOAD", "1")
    pass_name = PASS_NAMES[args.method]

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        os.environ["DISTILLC_CACHE"] = str(folder / "cache")
        plugins = load_plugins()
        write_teacher(plugins, folder / "teacher.safetensors", args)
        spec_path = folder / "spec.toml"
        options = METHOD_OPTIONS[args.method].format(views=args.views, blocks=args.blocks)
        spec_path.write_text(textwrap.dedent(SPEC).format(
            image_size=args.image_size, teacher=args.teacher, depth=args.teacher_depth, width=args.width,
            pass_name=pass_name, epochs=args.epochs, batch_size=args.batch_size, options=options))

        runs = {}
        for label, force in (("distillc, cache cold", None), ("distillc, cache warm", pass_name)):
            timer = EpochTimer()
            result = compile_spec(spec_path, workdir=folder / "work", progress=timer, until=pass_name,
                                  force=force, plugins=plugins)
            row = next(r for r in result.report["plan"] if r["id"] == pass_name)
            runs[label] = (timer.epoch_seconds(pass_name), row["seconds"])
        config = next(s for s in result.plan.steps if s.id == pass_name).pass_.config
        naive_epochs, naive_total, sizes = naive_loop(args.method, result.plan.spec, plugins, folder, config)

    print(f"method {pass_name} on sklearn-digits at {args.image_size} px: {sizes['images']} training images, "
          f"batch {args.batch_size}, {args.epochs} epochs")
    print(f"teacher {args.teacher} depth {args.teacher_depth} ({sizes['teacher'] / 1e6:.2f}M params), "
          f"student mobilenetv2 width {args.width} ({sizes['student'] / 1e3:.0f}K params)")
    print(f"device {sizes['device']}, torch threads {torch.get_num_threads()}")
    print(f"{'':24}{'s/epoch (mean)':>16}{'whole pass / epochs':>22}")
    runs["naive PyTorch loop"] = (naive_epochs, naive_total)
    per_epoch = {}
    for label, (epochs, total) in runs.items():
        per_epoch[label] = sum(epochs) / len(epochs)
        print(f"{label:<24}{per_epoch[label]:>16.2f}{total / args.epochs:>22.2f}")
    naive = per_epoch["naive PyTorch loop"]
    print(f"speed-up over the naive loop: {naive / per_epoch['distillc, cache warm']:.1f}x with a warm cache, "
          f"{naive * args.epochs / runs['distillc, cache cold'][1]:.1f}x for a whole cold run")


def write_teacher(plugins, path: Path, args) -> None:
    from safetensors.torch import save_file

    torch.manual_seed(0)
    teacher = plugins.teachers.get(args.teacher)(image_size=args.image_size, in_chans=1, depth=args.teacher_depth)
    save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, str(path))


def naive_loop(method: str, spec, plugins, folder: Path, cfg) -> tuple[list[float], float, dict]:
    """The same method written plainly: the teacher runs on every batch, nothing is cached."""
    from safetensors.torch import load_file

    from distillc.training import autocast, batches, count_params, epoch_generator, pick_device, prepare

    device = pick_device()
    data = spec.load_data(plugins)
    teacher_section, student_section = spec.teachers[0], spec.student
    size, channels = data.image_shape[-1], data.image_shape[0]
    teacher = plugins.teachers.get(teacher_section.arch)(image_size=size, in_chans=channels,
                                                          **teacher_section.options)
    teacher.load_state_dict(load_file(str(folder / "teacher.safetensors")))
    teacher = prepare(teacher, device).eval().requires_grad_(False)
    torch.manual_seed(spec.distillc.seed)
    student = prepare(plugins.students.get(student_section.arch)(image_size=size, in_chans=channels,
                                                                 **student_section.options), device).train()
    step = (naive_cadssl if method == "ca-dssl" else naive_bootleg)(teacher, student, cfg, device, data.image_shape)
    params = list(student.parameters()) + list(step.heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    n = len(data.train_x)
    total_steps = cfg.epochs * (n // cfg.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=total_steps, pct_start=0.15)
    epoch_times = []
    start = time.perf_counter()
    for epoch in range(cfg.epochs):
        t0 = time.perf_counter()
        gen = epoch_generator(spec.distillc.seed, epoch)
        for idx in batches(n, cfg.batch_size, gen, drop_last=True):
            x = data.train_x[idx].to(device, non_blocking=True)
            with autocast(device):
                loss = step(x, gen, epoch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        loss.item()  # wait for the device
        epoch_times.append(time.perf_counter() - t0)
    sizes = {"images": n, "teacher": count_params(teacher), "student": count_params(student), "device": device.type}
    return epoch_times, time.perf_counter() - start, sizes


def naive_cadssl(teacher, student, cfg, device, image_shape):
    """One CA-DSSL step: a fresh weak view through the teacher, then the pass's own view and loss functions."""
    import torch.nn.functional as F
    from torch import nn

    from distillc.passes.distill.cadssl import (augment_with_coordinates, curriculum, embedding_loss,
                                                feature_map_loss, pools_last_stage)
    from distillc.passes.distill.feature import projection_head
    from distillc.plugins.augment import Augment

    count = len(student.stage_channels)
    stages = [s % count for s in cfg.stages] if cfg.feature_weight > 0 else []
    pooled = bool(stages) and pools_last_stage(student, image_shape, device)
    width = teacher.embed_dim
    projector = projection_head(student.embed_dim, cfg.projector_hidden, width)
    adapters = nn.ModuleList(nn.Conv2d(student.stage_channels[s], width, 1) for s in stages)
    weak = Augment(strength=cfg.teacher_augment, flip=cfg.flip)

    def step(x, gen, epoch):
        with torch.no_grad():
            view = weak(x, gen)
            tokens = teacher.forward_tokens(view).float()  # one forward gives the CLS embedding and the patches
            embedding = F.normalize(tokens[:, 0], dim=1)
            patches = tokens[:, 1:].transpose(1, 2).reshape(len(x), width, teacher.grid, teacher.grid)
        strong = Augment(strength=curriculum(cfg.augment_start, cfg.augment_end, epoch, cfg.epochs), flip=cfg.flip)
        if not stages:
            return embedding_loss(projector(student(strong(view, gen))), embedding)
        student_view, coords = augment_with_coordinates(strong, view, gen)
        maps = student.forward_stages(student_view)
        z = maps[-1].mean(dim=(2, 3)) if pooled else student(student_view)
        return (embedding_loss(projector(z), embedding)
                + cfg.feature_weight * feature_map_loss([maps[s] for s in stages], adapters, patches, coords))

    step.heads = nn.ModuleDict({"projector": projector, "adapters": adapters}).to(device)
    return step


def naive_bootleg(teacher, student, cfg, device, image_shape):
    """One Bootleg step: the teacher's hidden states of the batch, then the pass's own loss functions."""
    from torch import nn

    from distillc.passes.distill.bootleg import (TARGET_PARTS, hidden_summaries, layer_losses, mask_input,
                                                 normalise_targets)
    from distillc.passes.distill.feature import projection_head

    blocks = [b % teacher.num_blocks for b in cfg.blocks]
    parts = TARGET_PARTS[cfg.target]
    grid = image_shape[-1] // (cfg.mask_patch or teacher.patch_size)
    out = len(parts) * getattr(teacher, "token_dim", teacher.embed_dim)
    predictors = nn.ModuleList(projection_head(student.embed_dim, cfg.predictor_hidden, out) for _ in blocks)

    def step(x, gen, epoch):
        with torch.no_grad():
            targets = normalise_targets(hidden_summaries(teacher, x, blocks, parts))
        z = student(mask_input(x, grid, cfg.mask_ratio, cfg.mask_fill, gen))
        return layer_losses(z, predictors, targets, cfg.loss).mean()

    step.heads = predictors.to(device)
    return step


if __name__ == "__main__":
    main()
