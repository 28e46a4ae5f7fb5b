"""The ``distillc`` command line: one typer app, thin commands over the library API.

Exit status: 0 success, 2 user error (one line per problem), 1 internal error (short report;
``--debug`` shows the traceback).  Heavy libraries are imported inside the passes, so ``--help``
and ``validate`` stay fast.
"""

from __future__ import annotations

import functools
import json
import math
import os
import signal
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from distillc import __version__
from distillc.errors import DistillcError, shorten, shown, workspace_error

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="distillc: distil frozen teachers into tiny students and compile them to MCU C bundles.")
out = Console(highlight=False)
err = Console(stderr=True, highlight=False)
_state = {"debug": False}


def _version(value: bool) -> None:
    if value:
        out.print(f"distillc {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors."),
) -> None:
    _state["debug"] = debug
    # Third-party deprecation chatter (Brevitas' fx backport, the TorchScript ONNX exporter that
    # Brevitas' QCDQ export needs) is noise on a user's terminal; --debug keeps it.
    if not debug:
        warnings.filterwarnings("ignore", module=r"brevitas(\.|$)")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
        warnings.filterwarnings("ignore", message="You are using the legacy TorchScript-based ONNX export")


def handled(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn errors into exit statuses: DistillcError -> 2, anything else -> 1.

    Ctrl-C (KeyboardInterrupt) exits with 130, the shell's convention for a process ended by
    SIGINT (128 + 2), after a line saying that finished epochs are checkpointed and a re-run
    resumes them.
    """

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        columns = os.environ.get("COLUMNS", "")
        if columns.isdigit():  # the width asked for now (rich reads COLUMNS once, at import)
            out.width = err.width = int(columns)
        elif not out.is_terminal:  # a pipe or a file: tables as wide as their content, nothing cut
            out.width = PIPE_WIDTH
        try:
            return command(*args, **kwargs)
        except typer.Exit:
            raise
        except DistillcError as exc:
            _user_error(exc)
        except KeyboardInterrupt:
            err.print("[bold red]interrupted[/]: finished epochs are checkpointed; run the same command to resume")
            raise typer.Exit(130) from None
        except Exception as exc:
            # A full disk or a read-only cache is the environment, not a bug (also inside a pass).
            environment = workspace_error(exc) or workspace_error(exc.__cause__)
            if environment is not None:
                _user_error(environment, exc)
            if _state["debug"]:
                err.print(traceback.format_exc(), markup=False)
            else:
                origin = exc.__cause__ or exc  # a crashing pass: point at the pass's own code
                frame = traceback.extract_tb(origin.__traceback__)[-1] if origin.__traceback__ else None
                where = f" at {Path(frame.filename).name}:{frame.lineno}" if frame else ""
                err.print(Text.assemble(("internal error:", "bold red"), f" {shorten(str(exc), MAX_LINE)}{where}"),
                          soft_wrap=True)
                err.print("this is a bug in distillc or a plugin; rerun with --debug for the traceback")
            raise typer.Exit(1) from None

    return wrapper


#: The longest error line printed; messages shorten the values they echo well below it.
MAX_LINE = 1000
#: The console width when stdout is not a terminal (and COLUMNS is not set): wide enough that no
#: table cell is cut or wrapped, so `distillc passes | grep ...` sees whole names.
PIPE_WIDTH = 10_000

JSON_OPTION = typer.Option(False, "--json", help="Print the same facts as JSON (for scripts).")


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def _user_error(exc: DistillcError, original: BaseException | None = None) -> None:
    """One ``error:`` line per line of the message, then exit status 2."""
    if _state["debug"]:
        err.print(traceback.format_exc(), markup=False)
    for line in str(exc).splitlines() or [type(original or exc).__name__]:
        err.print(Text.assemble(("error:", "bold red"), f" {shorten(line, MAX_LINE)}"), soft_wrap=True)
    raise typer.Exit(2) from None


def _load(spec_path: Path) -> tuple[Any, Any]:
    from distillc.plugin_manager import load_plugins
    from distillc.spec import load_spec

    plugins = load_plugins()
    return plugins, load_spec(spec_path, plugins)


# -- commands ---------------------------------------------------------------------------------


@app.command()
@handled
def validate(spec: Path = typer.Argument(..., help="The spec file (spec.toml).")) -> None:
    """Check a spec and its plan (artifact types of every step) without running or caching anything."""
    from distillc.plan import build_plan

    plugins, resolved = _load(spec)
    the_plan = build_plan(resolved, plugins)  # reads the cache's state, writes nothing
    out.print(f"{spec}: valid ({len(resolved.passes)} passes, target {resolved.file.target.use!r}, "
              f"{len(the_plan.steps)} steps planned)")


@app.command()
@handled
def plan(spec: Path = typer.Argument(..., help="The spec file (spec.toml)."),
         workdir: Optional[Path] = typer.Option(None, help="Work directory (default build/<name>/ beside the spec)."),
         as_json: bool = JSON_OPTION) -> None:
    """Print the resolved passes, their artifact types and what is cached."""
    from distillc.plan import build_plan

    plugins, resolved = _load(spec)
    the_plan = build_plan(resolved, plugins, workdir=workdir)
    if as_json:
        _print_json({"name": resolved.name, "cache": str(the_plan.store.root), "workdir": str(the_plan.workdir),
                     "steps": [{**step.describe(), "cached": step.cached} for step in the_plan.steps]})
        return
    table = Table(title=f"plan for {resolved.name}")
    for column in ("#", "step", "takes", "makes", "from", "cache"):
        table.add_column(column)
    for i, step in enumerate(the_plan.steps):
        d = step.describe()
        table.add_row(str(i + 1), *map(Text, (d["id"], d["takes"], d["makes"], d["source"])),
                      Text("cached", style="green") if step.cached else "will run")
    out.print(table)
    out.print(f"cache: {the_plan.store.root}")


@app.command("compile")
@handled
def compile_(
    spec: Path = typer.Argument(..., help="The spec file (spec.toml)."),
    workdir: Optional[Path] = typer.Option(None, help="Work directory (default build/<name>/ beside the spec)."),
    force: Optional[str] = typer.Option(None, help="Re-run this step and every step after it."),
    until: Optional[str] = typer.Option(None, help="Stop after this step."),
) -> None:
    """Run the spec's plan; the last line ends with the bundle's path (or the work directory)."""
    from distillc.run import compile_spec
    from distillc.progress import RichProgress

    result = compile_spec(spec, workdir=workdir, force=force, until=until, progress=RichProgress(out))
    from distillc import distributed

    if not distributed.is_main():
        return  # under torchrun, rank 0 prints the summary (docs/distributed.md)
    _print_summary(result.report)
    label = "bundle" if "bundle" in result.outputs else "workdir"
    out.print(f"{label}: {result.final_path}")


@app.command()
@handled
def passes(as_json: bool = JSON_OPTION) -> None:
    """List every registered pass and the plugin it came from."""
    from distillc.plugin_manager import load_plugins

    plugins = load_plugins()
    if as_json:
        _print_json([{"name": e.name, "takes": e.obj.takes_names(), "makes": e.obj.makes.kind,
                      "version": e.obj.version, "plugin": e.plugin, "origin": plugins.origin(e.plugin),
                      "description": e.obj.description} for e in plugins.passes])
        return
    table = Table(title="passes")
    for column in ("pass", "takes", "makes", "plugin", "description"):
        table.add_column(column)
    for entry in plugins.passes:
        cls = entry.obj
        table.add_row(*map(Text, (entry.name, cls.takes_names(), cls.makes.kind,
                                  f"{entry.plugin} ({plugins.origin(entry.plugin)})", cls.description)))
    out.print(table)


@app.command()
@handled
def targets(as_json: bool = JSON_OPTION) -> None:
    """List every registered target and the plugin it came from."""
    from distillc.artifacts import TorchModel
    from distillc.plugin_manager import load_plugins

    plugins = load_plugins()
    rows = []
    for entry in plugins.targets:
        cls = entry.obj
        rows.append({"name": entry.name, "backend": [name for name, _ in cls(cls.Config()).backend_passes(TorchModel)],
                     "plugin": entry.plugin, "origin": plugins.origin(entry.plugin), "description": cls.description})
    if as_json:
        _print_json(rows)
        return
    table = Table(title="targets")
    for column in ("target", "backend passes", "plugin", "description"):
        table.add_column(column)
    for row in rows:
        table.add_row(*map(Text, (row["name"], " -> ".join(row["backend"]), f"{row['plugin']} ({row['origin']})",
                                  row["description"])))
    out.print(table)


@app.command()
@handled
def inspect(bundle: Path = typer.Argument(..., help="A bundle directory (with manifest.json)."),
            as_json: bool = JSON_OPTION) -> None:
    """Show a bundle's facts as tables: model and target, memory, layers, quantization, training,
    verification (what report.html shows; --json: the manifest, plus those facts as "report")."""
    from distillc.bundle_report import report_facts

    manifest = _read_manifest(bundle)
    try:
        facts = report_facts(manifest)
        if as_json:
            _print_json({**manifest, "report": facts})
            return
        _show_manifest(manifest, facts)
    except (AttributeError, IndexError, KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
        # a manifest edited by hand
        raise DistillcError(f"{bundle / 'manifest.json'}: unexpected content ({shorten(repr(exc))}); "
                            "compile the bundle again") from None


@app.command()
@handled
def report(bundle: Path = typer.Argument(..., help="A bundle directory (with manifest.json)."),
           output: Optional[Path] = typer.Option(None, "--output", help="Where to write the page "
                                                 "(default: BUNDLE/report.html).")) -> None:
    """Write the bundle's report.html again from its manifest.json (no network, no compile)."""
    from distillc.bundle_report import REPORT_FILE, render_html
    from distillc.cache import write_atomic

    manifest = _read_manifest(bundle)
    path = output if output is not None else bundle / REPORT_FILE
    if path.is_dir() or not path.parent.is_dir():
        raise DistillcError(f"--output {path}: " + ("is a folder; give a file name" if path.is_dir() else
                                                    f"folder {path.parent} does not exist; create it first"))
    try:
        page = render_html(manifest)
    except (AttributeError, IndexError, KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
        raise DistillcError(f"{bundle / 'manifest.json'}: unexpected content ({shorten(repr(exc))}); "
                            "compile the bundle again") from None
    try:
        write_atomic(path, page)
    except OSError as exc:
        raise DistillcError(f"cannot write {path}: {exc.strerror or exc}") from None
    out.print(f"wrote {path}")


def _fraction(value: Any) -> str:
    return "-" if value is None else f"{value:.3f}"


def _show_manifest(manifest: dict[str, Any], facts: dict[str, Any]) -> None:
    model, budget, speed = facts["model"], facts["budget"], facts["speed"]
    summary = Table(title=f"{model['name']} on {model['target']}")
    summary.add_column("fact")
    summary.add_column("value")
    for name, label in (("flash", "flash"), ("ram", "RAM")):
        b = budget[name]
        value = f"{b['used_bytes']} B" + (f" of {b['budget_bytes']} B ({100 * b['used_bytes'] / b['budget_bytes']:.1f} %)"
                                          if b["budget_bytes"] else " (no budget)")
        summary.add_row(Text(f"{label}: {b['what']}"), Text(value))
    summary.add_row(Text("MACs per inference"), Text(str(model["macs"])))
    if speed["instructions_per_inference"]:
        summary.add_row(Text(f"instructions per inference ({speed['machine']})"),
                        Text(str(speed["instructions_per_inference"])))
        ips = speed["inferences_per_second"]
        summary.add_row(Text(f"inferences per second at {speed['clock_mhz']} MHz (estimate)" if ips else
                             "inferences per second"),
                        Text(f"{ips:.1f}" if ips else "unknown (no clock_mhz)"))
    out.print(summary)
    if speed["instructions_per_inference"]:
        out.print(Text(f"speed: {speed['note']}"))
    io = Table(title="input / output")
    for column in ("tensor", "shape", "dtype", "scale", "zero point"):
        io.add_column(column)
    for name in ("input", "output"):
        t = manifest.get(name, {})
        io.add_row(*map(Text, (name, str(t.get("shape")), str(t.get("dtype")), str(t.get("scale")),
                               str(t.get("zero_point")))))
    out.print(io)
    memory = Table(title="memory")
    memory.add_column("item")
    memory.add_column("bytes", justify="right")
    for key, value in manifest.get("memory", {}).items():
        if not isinstance(value, (list, dict)):  # live_bytes: the arena timeline, in report.html
            memory.add_row(Text(str(key)), Text(str(value)))
    out.print(memory)
    layers = facts["layers"]
    if layers:
        table = Table(title=f"layers ({len(layers)}); instructions per layer: {speed['per_layer']}")
        counted = ("instructions", "instructions_per_mac") if speed["per_layer"] == "measured" else ()
        columns = ("index", "name", "op", "input_shape", "output_shape", "macs", "weight_bytes", "arena_offset",
                   "arena_bytes", *counted, "mac_share", "sqnr_db")
        for column in columns:
            table.add_column(column)
        for layer in layers:
            cells = []
            for c in columns:
                value = layer.get(c)
                cells.append(Text("" if value is None else f"{100 * value:.1f} %" if c == "mac_share" else
                                  f"{value:.2f}" if c == "instructions_per_mac" else str(value)))
            table.add_row(*cells)
        out.print(table)
    quant = facts["quantization"]
    for row in quant["accuracy"]:
        out.print(f"{row['step']}: {row['metric']} FP32 {row['fp32']:.4f}, INT8 {row['int8']:.4f}")
    if quant["layer_sqnr"] == "measured":
        out.print(f"SQNR against {quant['sqnr_reference']} on {quant['sqnr_images']} image(s): output "
                  f"{quant['output_sqnr_db']} dB, lowest layer {quant['min_layer_sqnr_db']} dB")
    for curve in facts["training"]:
        losses = curve["losses"]
        out.print(f"training {curve['label']}: {len(losses)} epoch(s), loss {losses[0]:.4g} -> {losses[-1]:.4g}")
    if manifest.get("matryoshka_dims"):
        out.print(f"Matryoshka dims: {manifest['matryoshka_dims']}")
    for curve in facts["matryoshka"]:
        pairs = ", ".join(f"{d}: {t:.4f}" for d, t in zip(curve["dims"], curve["top1"]))
        out.print(f"{curve['label']}: {pairs}")
    detection = facts.get("detection")
    if detection:
        out.print(f"distillc_detect: {len(detection['classes'] or [])} classes, dims {detection['dims']}, "
                  f"{detection['grid']}x{detection['grid']} cells, {detection['flash_bytes']} B flash, "
                  f"{detection['scratch_bytes']} B arena scratch")
        for e in detection["evals"]:
            for r in e["rows"]:
                out.print(f"{e['label']} dim {r['dim']}: mAP@0.5 seen {_fraction(r['seen_map50'])}, unseen "
                          f"{_fraction(r['unseen_map50'])} (random classes {_fraction(r['random_unseen_map50'])})")
    for name, v in facts["verification"].items():
        line = f"verify.{name}: {v['images']} image(s), max {v['max_lsb']} LSB"
        if v["explained"]:
            line += (f", {v['tie_differences']} kernel value(s) on float32 rounding ties "
                     f"({v['kernels_checked']} kernels checked)")
        out.print(line)
    izer = manifest.get("izer")
    if izer and izer.get("exported"):
        out.print(f"MAX78000 accelerator (izer/): {izer['layers']} layers, {izer['weights_bytes']} weight bytes, "
                  f"output shifts {izer['output_shifts']}, embedding cosine vs onnxruntime >= "
                  f"{izer['embedding_cosine_min']:.4f}; files: {', '.join(izer['files'])}")
    elif izer:
        out.print(f"MAX78000 accelerator: not exported ({'; '.join(izer.get('reasons', []))})")


@app.command("run")
@handled
def run_bundle(
    bundle: Path = typer.Argument(..., help="A bundle directory (with manifest.json)."),
    input: Path = typer.Option(..., "--input", help="float32 .npy in the manifest's input shape (a leading batch allowed)."),
    output: Optional[Path] = typer.Option(None, "--output", help="Where to write the output .npy."),
    qemu: bool = typer.Option(False, "--qemu", help="Run on QEMU, on the board the manifest names (the one the bundle was verified on)."),
    raw: bool = typer.Option(False, "--raw", help="Write the int8 output as the C code produced it."),
    detections: Optional[Path] = typer.Option(None, "--detections", help="A bundle with distillc_detect: write its detections as JSON."),
    dim: Optional[int] = typer.Option(None, "--dim", help="With --detections: the Matryoshka dim (default: the largest)."),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="With --detections: the score threshold, 0..1 (default: the spec's)."),
) -> None:
    """Build the bundle's C, run it on an input, write the output (dequantized unless --raw) and,
    for a detection bundle, what distillc_detect finds (--detections)."""
    import tempfile

    import numpy as np

    from distillc.passes.backend.codegen_c import quantize_inputs
    from distillc.targets.runner import run_on_host, run_on_qemu

    manifest = _read_manifest(bundle, tensors=True)
    if output is None and detections is None:
        raise DistillcError("give --output FILE.npy, --detections FILE.json or both")
    for option, path, kind in (("--output", output, ".npy"), ("--detections", detections, ".json")):
        if path is not None and (path.is_dir() or not path.parent.is_dir()):
            raise DistillcError(f"{option} {path}: " + (f"is a folder; give a {kind} file name" if path.is_dir() else
                                                        f"folder {path.parent} does not exist; create it first"))
    if detections is None and (dim is not None or threshold is not None):
        raise DistillcError("--dim and --threshold go with --detections")
    case = _detection_case(bundle, manifest, dim, threshold) if detections is not None else None
    try:
        x = np.load(input, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DistillcError(f"--input {input}: cannot read a .npy array ({exc})") from None
    shape = tuple(manifest["input"]["shape"])
    per_item = int(np.prod(shape[1:]))
    if x.dtype.kind != "f" or x.size % per_item or x.shape[-len(shape) + 1:] != shape[1:]:
        raise DistillcError(f"--input {input}: expected float32 of shape {list(shape)} (or [n, {', '.join(map(str, shape[1:]))}]), "
                            f"got {x.dtype} {list(x.shape)}")
    batch = x.reshape(-1, *shape[1:])
    q = quantize_inputs(batch, manifest["input"])
    with tempfile.TemporaryDirectory(prefix="distillc-run-") as work:
        if case is not None:
            from distillc.targets.runner import detect_on_host, detect_on_qemu

            run = (detect_on_qemu(bundle, q, Path(work), [case], machine=_qemu_board(manifest)) if qemu
                   else detect_on_host(bundle, q, Path(work), [case]))
            outputs = run.outputs
            _write_detections(detections, manifest, run, case)
        elif qemu:
            machine = _qemu_board(manifest)
            result = run_on_qemu(bundle, q, Path(work), machine=machine)
            outputs = result.outputs
            err.print(f"{machine}: {result.instructions_per_inference} instructions per inference")
        else:
            outputs = run_on_host(bundle, q, Path(work))
    if output is None:
        return
    out_shape = (len(batch), *manifest["output"]["shape"][1:])
    outputs = outputs.reshape(out_shape)
    if not raw:
        quant = manifest["output"]
        outputs = ((outputs.astype(np.float32) - np.float32(quant["zero_point"])) * np.float32(quant["scale"]))
    np.save(output, outputs)
    out.print(f"wrote {output} ({outputs.dtype}, shape {list(outputs.shape)})")


def _detection_case(bundle: Path, manifest: dict[str, Any], dim: Optional[int],
                    threshold: Optional[float]) -> tuple[int, int, int]:
    """``(dim, threshold Q15, max_out)`` for ``distillc_detect`` from ``run``'s options and the manifest."""
    entry = manifest.get("detection")
    if not isinstance(entry, dict) or not isinstance(entry.get("dims"), list) or not entry["dims"]:
        raise DistillcError(f"--detections: {bundle} has no detection decoder (its manifest has no 'detection' "
                            "entry; compile a spec with detect.open-vocab)")
    dims = [int(d) for d in entry["dims"]]
    if dim is not None and dim not in dims:
        raise DistillcError(f"--dim {dim}: the bundle decodes the Matryoshka dims {', '.join(map(str, dims))}")
    if threshold is not None and not (math.isfinite(threshold) and 0.0 <= threshold <= 1.0):
        raise DistillcError(f"--threshold {threshold}: a score threshold is a fraction in 0..1")
    q15 = int(entry["score_threshold_q15"]) if threshold is None else int(round(threshold * 32768))
    return (dims[-1] if dim is None else dim), q15, int(entry["max_detections"])


def _write_detections(path: Path, manifest: dict[str, Any], run: Any, case: tuple[int, int, int]) -> None:
    """``distillc_detect``'s detections per input as JSON: boxes in pixels, scores as fractions."""
    entry = manifest["detection"]
    classes = entry.get("classes", [])
    images = []
    for i in range(len(run.outputs)):
        count, rows = run.detect[(i, 0)]
        images.append({"image": i, "detections": [
            {"box": [int(v) / 16 for v in row[:4]], "score": int(row[4]) / 32768, "class_id": int(row[5]),
             "class": classes[int(row[5])] if int(row[5]) < len(classes) else None} for row in rows[:max(count, 0)]]})
    dim, q15, max_out = case
    path.write_text(json.dumps({"dim": dim, "threshold": q15 / 32768, "threshold_q15": q15, "max_detections": max_out,
                                "box_units": "pixels (x0, y0, x1, y1) of the model input", "images": images},
                               indent=2) + "\n")
    total = sum(len(image["detections"]) for image in images)
    out.print(f"wrote {path} ({total} detection(s) in {len(images)} image(s), dim {dim}, threshold {q15 / 32768:.4g})")


def _qemu_board(manifest: dict[str, Any]) -> str:
    """The QEMU board a bundle was verified on (``verification.qemu.machine``), else the board its
    target verifies on (the target's ``verify.qemu`` config), else mps2-an500 (a host bundle)."""
    verified = manifest.get("verification")
    qemu = verified.get("qemu") if isinstance(verified, dict) else None
    if isinstance(qemu, dict) and isinstance(qemu.get("machine"), str):
        return qemu["machine"]
    target = manifest.get("target")
    name = target.get("name") if isinstance(target, dict) else None
    if isinstance(name, str):
        from distillc.artifacts import OnnxModel
        from distillc.plugin_manager import load_plugins

        targets = load_plugins().targets
        if name in targets:
            cls = targets.get(name)
            for pass_name, config in cls(cls.Config()).backend_passes(OnnxModel):
                if pass_name == "verify.qemu" and "machine" in config:
                    return str(config["machine"])
    return "mps2-an500"


def _read_manifest(bundle: Path, *, tensors: bool = False) -> dict[str, Any]:
    """The bundle's manifest.json as a dict; a missing, broken or empty one is one error line.

    ``tensors``: also check what ``run`` reads (``input`` and ``output``: shape, scale, zero point).
    """
    path = bundle / "manifest.json"
    if not path.is_file():
        raise DistillcError(f"{bundle}: not a bundle (no manifest.json)")
    again = "compile the bundle again (distillc compile SPEC writes <workdir>/bundle/)"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise DistillcError(f"{path}: not a readable manifest ({shorten(str(exc) or type(exc).__name__)}); "
                            f"{again}") from None
    if not isinstance(manifest, dict) or not manifest:
        raise DistillcError(f"{path}: not a manifest (expected a JSON object with the bundle's keys, found "
                            f"{shown(manifest, 40)}); {again}")
    for name in ("input", "output") if tensors else ():
        quant = manifest.get(name)
        shape = quant.get("shape") if isinstance(quant, dict) else None
        if not (isinstance(shape, list) and shape and all(type(d) is int and d >= 1 for d in shape)
                and _finite_number(quant.get("scale")) and type(quant.get("zero_point")) is int):
            raise DistillcError(f"{path}: {name!r} needs a shape (positive integers), a scale and a zero_point "
                                f"(found {shown(quant, 60)}); {again}")
    return manifest


def _finite_number(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


# -- summary ----------------------------------------------------------------------------------


def _print_summary(report: dict[str, Any]) -> None:
    table = Table(title=f"distillc compile: {report['name']}")
    for column in ("step", "status", "seconds", "metrics"):
        table.add_column(column)
    for row in report["plan"]:
        metrics = report["metrics"].get(row["id"], {})
        table.add_row(*map(Text, (row["id"], row["status"], f"{row['seconds']:.1f}", _format_metrics(metrics))))
    out.print(table)
    for name, path in report["outputs"].items():
        out.print(f"{name}: {path}")
    if "bundle" in report["outputs"]:
        manifest = json.loads((Path(report["outputs"]["bundle"]) / "manifest.json").read_text())
        memory, qemu = manifest["memory"], manifest.get("verification", {}).get("qemu", {})
        line = (f"arena {memory['arena_bytes']} B (floor {memory['arena_floor_bytes']} B), "
                f"weights in flash {memory['weights_bytes']} B")
        if qemu:
            line += (f", {qemu['machine']}: {qemu['instructions_per_inference']} instructions per inference, "
                     f"model flash {qemu['model_flash_bytes']} B (whole example program "
                     f"{qemu['program_flash_bytes']} B)")
        out.print(line)
    out.print(f"report: {Path(report['workdir']) / 'report.json'}  ({report['total_seconds']:.1f} s)")


def _format_metrics(metrics: dict[str, Any], prefix: str = "") -> str:
    parts = []
    for key, value in metrics.items():
        if isinstance(value, dict):
            inner = _format_metrics(value, prefix=f"{prefix}{key}.")
            if inner:
                parts.append(inner)
        elif isinstance(value, float):
            parts.append(f"{prefix}{key}={value:.4g}")
        elif isinstance(value, (int, str)) and len(str(value)) < 60:
            parts.append(f"{prefix}{key}={value}")
    return "  ".join(parts)


def main() -> None:
    """Console-script entry point."""
    _interrupt_on_termination()
    app(prog_name="distillc")


def _interrupt_on_termination() -> None:
    """SIGTERM and SIGHUP (a plain ``kill``, a closed terminal) stop a command as Ctrl-C does:
    the tools it runs are killed with their process groups (``targets/toolchain.py``), finished
    epochs stay checkpointed and the exit status is 130."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    for name in ("SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), interrupt)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
