"""``bundle/report.html``: one self-contained page about a compiled bundle, rebuilt from its manifest.

:func:`report_facts` reads a bundle's ``manifest.json`` (with the metrics of every pass, which
the runner adds when it publishes the bundle) into the facts the page shows: flash and RAM
against the target's budget, instructions per inference and what they give at the target's
clock, one row per layer, the arena timeline, quantization (FP32 vs INT8, per-layer SQNR),
training curves, Matryoshka accuracy per dim, and the verification.  ``distillc inspect``
prints the same facts and ``inspect --json`` gives them as ``"report"``.

:func:`render_html` draws them with matplotlib (Agg, SVG inline, fixed hash salt and no date,
so the same manifest gives the same bytes) into a page that needs no network: no script, style
or font is fetched.  :func:`write_report` writes it; the runner calls it for every published
bundle and ``distillc report BUNDLE`` calls it again.
"""

from __future__ import annotations

import html
import io
import json
import math
import re
from pathlib import Path
from typing import Any

REPORT_FILE = "report.html"

#: What the instruction figures are, wherever they are shown.
INSTRUCTIONS_NOTE = ("an instruction-count estimate: QEMU counts executed instructions, not cycles (no caches, "
                     "flash wait states or pipeline); inferences per second = clock / instructions, i.e. one "
                     "instruction per cycle")
NOT_MEASURED = "not measured"

# -- facts ------------------------------------------------------------------------------------------


def report_facts(manifest: dict[str, Any]) -> dict[str, Any]:
    """The report's facts from a bundle's manifest, as JSON-able values (None: not known)."""
    metrics = _dict(manifest.get("metrics"))
    verification = _dict(manifest.get("verification"))
    host, qemu = _dict(verification.get("host")), _dict(verification.get("qemu"))
    target, memory = _dict(manifest.get("target")), _dict(manifest.get("memory"))
    layers = [layer for layer in manifest.get("layers") or [] if isinstance(layer, dict)]
    order = _step_order(manifest, metrics)

    macs_total = sum(_int(layer.get("macs")) for layer in layers)
    instructions = _number(qemu.get("instructions_per_inference"))
    clock = _number(target.get("clock_mhz"))
    # verify.qemu's counts per kernel call (mean over its inputs), one entry per manifest layer.
    counted = qemu.get("layers")
    per_layer_instr = None
    if isinstance(counted, list) and len(counted) == len(layers) and all(isinstance(c, dict) for c in counted):
        per_layer_instr = [_number(c.get("instructions")) for c in counted]
    sqnr = host.get("layer_sqnr_db")
    if not (isinstance(sqnr, list) and len(sqnr) == len(layers)):
        sqnr = None
    rows = []
    for index, layer in enumerate(layers):
        macs = _int(layer.get("macs"))
        rows.append({
            "index": index, "name": layer.get("name"), "op": layer.get("op"),
            "input_shape": layer.get("input_shape"), "output_shape": layer.get("output_shape"),
            "macs": macs, "weight_bytes": _int(layer.get("weight_bytes")),
            "arena_offset": layer.get("arena_offset"), "arena_bytes": layer.get("arena_bytes"),
            "instructions": per_layer_instr[index] if per_layer_instr else None,
            "instructions_per_mac": per_layer_instr[index] / macs if per_layer_instr and per_layer_instr[index]
            and macs else None,
            "mac_share": macs / macs_total if macs_total else None,
            "sqnr_db": sqnr[index] if sqnr else None,
        })

    # What codegen.c counts against flash_kb: the weights and every C extension's constants
    # (an extension named N stores manifest[N] and memory["N_bytes"]).
    flash_keys = ["weights_bytes"] + [k for k in memory if k.endswith("_bytes") and k != "weights_bytes"
                                      and isinstance(manifest.get(k.removesuffix("_bytes")), dict)]
    flash_used = sum(_int(memory.get(k)) for k in flash_keys)
    flash_kb, ram_kb = _number(target.get("flash_kb")), _number(target.get("ram_kb"))
    return {
        "model": {
            "name": manifest.get("name"), "target": target.get("name"), "clock_mhz": clock,
            "input": _dict(manifest.get("input")).get("shape"), "output": _dict(manifest.get("output")).get("shape"),
            "layers": len(layers), "kernels": manifest.get("kernels"), "macs": macs_total,
            "float_fallback": manifest.get("float_fallback") or [],
        },
        "budget": {
            "flash": {"used_bytes": flash_used, "budget_bytes": int(flash_kb * 1024) if flash_kb else None,
                      "what": "constants: " + ", ".join(k.removesuffix("_bytes").replace("_", " ")
                                                        for k in flash_keys),
                      "measured_model_flash_bytes": _number(qemu.get("model_flash_bytes"))},
            "ram": {"used_bytes": _int(memory.get("arena_bytes")), "budget_bytes": int(ram_kb * 1024) if ram_kb else None,
                    "what": "the activation arena" + (f" (in {memory['arena_bank']})" if memory.get("arena_bank") else ""),
                    "measured_stack_bytes": _number(qemu.get("stack_bytes"))},
        },
        "speed": {
            "instructions_per_inference": instructions, "machine": qemu.get("machine"), "clock_mhz": clock,
            "inferences_per_second": clock * 1e6 / instructions if clock and instructions else None,
            "instructions_per_mac": instructions / macs_total if instructions and macs_total else None,
            "note": INSTRUCTIONS_NOTE,
            "per_layer": "measured" if per_layer_instr else NOT_MEASURED,
            "layers_instructions_sum": _number(qemu.get("layers_instructions_sum")) if per_layer_instr else None,
            "trace_overhead_instructions": _number(qemu.get("trace_overhead_instructions")) if per_layer_instr else None,
            "layer_resolution_instructions": _number(qemu.get("layer_resolution_instructions"))
            if per_layer_instr else None,
        },
        "layers": rows,
        "arena": {"live_bytes": memory.get("live_bytes") if isinstance(memory.get("live_bytes"), list) else None,
                  "floor_bytes": memory.get("arena_floor_bytes"), "arena_bytes": memory.get("arena_bytes"),
                  "strategy": memory.get("plan_strategy"), "schedule": _schedule(memory)},
        "quantization": {
            "accuracy": _fp32_vs_int8(metrics, order),
            "sqnr_images": host.get("sqnr_images"), "sqnr_reference": host.get("sqnr_reference"),
            "output_sqnr_db": host.get("output_sqnr_db"), "min_layer_sqnr_db": host.get("min_layer_sqnr_db"),
            "layer_sqnr": "measured" if sqnr else NOT_MEASURED,
        },
        "training": _training_curves(metrics, order),
        "matryoshka": _matryoshka(manifest, metrics, order),
        "detection": _detection(manifest, metrics, order),
        "verification": {name: _verification(section) for name, section in verification.items()
                         if isinstance(section, dict)},
    }


def _step_order(manifest: dict[str, Any], metrics: dict[str, Any]) -> list[str]:
    """Step ids in plan order (``manifest["steps"]``), then any other step with metrics."""
    steps = [s for s in manifest.get("steps") or [] if isinstance(s, str)]
    return steps + [s for s in metrics if s not in steps]


def _fp32_vs_int8(metrics: dict[str, Any], order: list[str]) -> list[dict[str, Any]]:
    rows = []
    for step in order:
        m = _dict(metrics.get(step))
        fp32, int8 = _dict(m.get("fp32")), _dict(m.get("int8"))
        for key in fp32:
            if _number(fp32.get(key)) is not None and _number(int8.get(key)) is not None:
                rows.append({"step": step, "metric": key, "fp32": fp32[key], "int8": int8[key]})
    return rows


def _training_curves(metrics: dict[str, Any], order: list[str]) -> list[dict[str, Any]]:
    """Every per-epoch loss list a training step recorded (``*epoch_losses``)."""
    curves = []
    for step in order:
        for key, value in _dict(metrics.get(step)).items():
            if key.endswith("epoch_losses") and isinstance(value, list) and value \
                    and all(_number(v) is not None for v in value):
                label = step if key == "epoch_losses" else f"{step} ({key.removesuffix('_epoch_losses').replace('_', ' ')})"
                curves.append({"step": step, "metric": key, "label": label, "losses": [float(v) for v in value]})
    return curves


def _matryoshka(manifest: dict[str, Any], metrics: dict[str, Any], order: list[str]) -> list[dict[str, Any]]:
    """Top-1 per Matryoshka dim, from every step that scored it (``{"16": 0.8, ...}`` dicts)."""
    if not manifest.get("matryoshka_dims"):
        return []
    out = []
    for step in order:
        for key, value in _dict(metrics.get(step)).items():
            if "top1" in key and isinstance(value, dict) and value \
                    and all(re.fullmatch(r"\d+", str(k)) and _number(v) is not None for k, v in value.items()):
                dims = sorted(value, key=int)
                out.append({"step": step, "metric": key, "label": f"{step} {key.replace('_', ' ')}",
                            "dims": [int(d) for d in dims], "top1": [float(value[d]) for d in dims]})
    return out


def _detection(manifest: dict[str, Any], metrics: dict[str, Any], order: list[str]) -> dict[str, Any] | None:
    """The detection decoder (``manifest["detection"]``), the mAP each ``eval.detection`` step
    measured per dim (seen, unseen, and with random class embeddings) and its verification."""
    entry = manifest.get("detection")
    if not isinstance(entry, dict):
        return None
    evals = []
    for step in order:
        m = _dict(metrics.get(step))
        if step.split("#")[0] != "eval.detection" or not isinstance(m.get("per_dim"), dict):
            continue
        rows = []
        for dim in sorted(m["per_dim"], key=lambda d: int(d) if str(d).isdigit() else 0):
            row, rnd = _dict(m["per_dim"][dim]), _dict(_dict(m.get("random_classes")).get(dim))
            rows.append({"dim": int(dim), "map": _number(row.get("map")),
                         "seen_map50": _number(_dict(row.get("seen")).get("map50")),
                         "unseen_map50": _number(_dict(row.get("unseen")).get("map50")),
                         "random_unseen_map50": _number(_dict(rnd.get("unseen")).get("map50"))})
        evals.append({"step": step, "label": f"{step} ({'INT8' if m.get('quantized') else 'FP32'})", "rows": rows})
    checks = {name: {k: section["detection"].get(k) for k in ("decoded", "decoder_matches", "onnxruntime_identical",
                                                              "onnxruntime_within_one_step", "onnxruntime_differing")}
              for name, section in _dict(manifest.get("verification")).items()
              if isinstance(section, dict) and isinstance(section.get("detection"), dict)}
    return {"classes": entry.get("classes"), "dims": entry.get("dims"), "grid": entry.get("grid"),
            "stride": entry.get("stride"), "flash_bytes": entry.get("flash_bytes"),
            "scratch_bytes": entry.get("scratch_bytes"), "evals": evals, "verification": checks}


def _verification(section: dict[str, Any]) -> dict[str, Any]:
    kernels = _dict(section.get("kernels"))
    return {"images": section.get("images"), "max_lsb": section.get("max_lsb"),
            "exact_fraction": section.get("exact_fraction"), "machine": section.get("machine"),
            "kernels_checked": kernels.get("kernels_checked"),
            "tie_differences": kernels.get("kernel_tie_differences"),
            "kernel_max_lsb": kernels.get("kernel_max_lsb"),
            "explained": bool(kernels), "instructions_per_inference": section.get("instructions_per_inference")}


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _number(value: Any) -> float | int | None:
    if type(value) in (int, float) and math.isfinite(value):
        return value
    return None


def _int(value: Any) -> int:
    return int(value) if type(value) is int else 0


# -- HTML -------------------------------------------------------------------------------------------


def write_report(bundle_dir: Path, manifest: dict[str, Any] | None = None) -> Path:
    """Write ``bundle_dir/report.html`` from ``manifest`` (default: the bundle's manifest.json)."""
    from distillc.cache import write_atomic

    bundle_dir = Path(bundle_dir)
    if manifest is None:
        manifest = json.loads((bundle_dir / "manifest.json").read_text(encoding="utf-8"))
    path = bundle_dir / REPORT_FILE
    write_atomic(path, render_html(manifest))
    return path


def render_html(manifest: dict[str, Any]) -> str:
    """The whole page: inline CSS and SVG, one small inline script (it records script errors and
    which figures were laid out, in attributes of ``<html>``), nothing fetched."""
    facts = report_facts(manifest)
    model = facts["model"]
    sections = [_overview(facts), _layers_section(facts), _arena_section(facts), _quantization_section(facts),
                _training_section(facts), _matryoshka_section(facts), _detection_section(facts),
                _verification_section(facts)]
    title = f"distillc report: {model['name'] or 'bundle'}"
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title>",
        f"<style>{_CSS}</style>",
        f"<script>{_SCRIPT}</script>",
        "</head>",
        "<body>",
        f"<h1>{_e(title)}</h1>",
        *[s for s in sections if s],
        "<footer>Written by distillc from the bundle's manifest.json; <code>distillc report BUNDLE</code> "
        "writes it again.</footer>",
        "</body>",
        "</html>",
        "",
    ])


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:2em auto;max-width:72em;
padding:0 1em;color:#1d232a;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em}h2{font-size:1.25em;border-bottom:1px solid #d0d7de;padding-bottom:.2em;
margin-top:2em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}th,td{border:1px solid #d0d7de;padding:.2em .55em;
text-align:right}th{background:#f3f5f7}td.l,th.l{text-align:left}
.facts td:first-child{text-align:left;font-weight:600}.note{color:#57606a;font-size:.88em}
figure.plot{margin:.8em 0}figure.plot svg{max-width:100%;height:auto}
figcaption{color:#57606a;font-size:.88em}.scroll{max-height:36em;overflow:auto}
.scroll table{font-size:.8em}.scroll td{white-space:nowrap}
code{background:#f3f5f7;padding:0 .25em}footer{margin-top:3em;color:#57606a;font-size:.85em}
""".replace("\n", "")

#: Records uncaught errors and, after load, where every figure was laid out (its SVG's box): a
#: browser test (tests/test_report.py) reads both from the DOM; a reader never sees them.
_SCRIPT = (
    "window.addEventListener('error',function(e){var h=document.documentElement;"
    "h.setAttribute('data-errors',(h.getAttribute('data-errors')||'')+(e.message||'error')+';');});"
    "window.addEventListener('load',function(){var f=document.querySelectorAll('figure.plot');"
    "var n=0;f.forEach(function(x){var s=x.querySelector('svg');var r=s?s.getBoundingClientRect():null;"
    "if(r&&r.width>50&&r.height>50){n++;x.setAttribute('data-rendered','yes');"
    "x.setAttribute('data-box',[r.left,r.top+window.scrollY,r.width,r.height].map(Math.round).join(','));}});"
    "document.documentElement.setAttribute('data-figures',f.length+'/'+n);});"
)


def _overview(facts: dict[str, Any]) -> str:
    model, budget, speed = facts["model"], facts["budget"], facts["speed"]
    rows = [("model", model["name"]), ("target", model["target"]),
            ("input / output", f"{_shape(model['input'])} -> {_shape(model['output'])} (int8)"),
            ("layers / C kernels", f"{model['layers']} / {model['kernels']}"),
            ("MACs per inference", _n(model["macs"])),
            ("float fallback", ", ".join(model["float_fallback"]) or "none (integer only)")]
    for name in ("flash", "ram"):
        b = budget[name]
        used = f"{_n(b['used_bytes'])} B"
        if b["budget_bytes"]:
            used += f" of {_n(b['budget_bytes'])} B ({100 * b['used_bytes'] / b['budget_bytes']:.1f} %)"
        rows.append((f"{'flash' if name == 'flash' else 'RAM'}: {b['what']}", used))
    if budget["flash"]["measured_model_flash_bytes"]:
        rows.append(("flash of the model's objects, code included (measured)",
                     f"{_n(budget['flash']['measured_model_flash_bytes'])} B"))
    if budget["ram"]["measured_stack_bytes"]:
        rows.append(("stack used by the example program (measured)", f"{_n(budget['ram']['measured_stack_bytes'])} B"))
    if speed["instructions_per_inference"]:
        rows.append((f"instructions per inference ({speed['machine']}, QEMU)", _n(speed["instructions_per_inference"])))
        if speed["instructions_per_mac"]:
            rows.append(("instructions per MAC", f"{speed['instructions_per_mac']:.2f}"))
        if speed["inferences_per_second"]:
            rows.append((f"inferences per second at {_g(speed['clock_mhz'])} MHz (estimate)",
                         f"{speed['inferences_per_second']:.1f}"))
        else:
            rows.append(("inferences per second", "unknown (the target records no clock_mhz)"))
    else:
        rows.append(("instructions per inference", "not measured (no verify.qemu run)"))
    parts = ["<h2>Model and target</h2>", _facts_table(rows)]
    if speed["instructions_per_inference"]:
        parts.append(f'<p class="note">Speed is {_e(speed["note"])}.</p>')
    parts.append(_figure("budget", "Flash and RAM against the target's budget", _plot_budget(budget)))
    return "\n".join(parts)


def _layers_section(facts: dict[str, Any]) -> str:
    rows = facts["layers"]
    if not rows:
        return ""
    measured = facts["speed"]["per_layer"] == "measured"
    head = ["#", "name", "op", "input", "output", "MACs", "weight B", "arena offset", "arena B",
            "instructions" + ("" if measured else " (per layer)"), *(["instr/MAC"] if measured else []),
            "share of MACs", "SQNR dB"]
    body = []
    for r in rows:
        per_mac = [f"{r['instructions_per_mac']:.2f}" if r["instructions_per_mac"] else "-"] if measured else []
        body.append([str(r["index"]), _e(r["name"]), _e(r["op"]), _shape(r["input_shape"]), _shape(r["output_shape"]),
                     _n(r["macs"]), _n(r["weight_bytes"]),
                     "output buffer" if r["arena_offset"] is None and r["arena_bytes"] == 0 else _n(r["arena_offset"]),
                     _n(r["arena_bytes"]), _n(r["instructions"]) if measured else NOT_MEASURED, *per_mac,
                     f"{100 * r['mac_share']:.1f} %" if r["mac_share"] is not None else "",
                     f"{r['sqnr_db']:.1f}" if r["sqnr_db"] is not None else "-"])
    speed = facts["speed"]
    note = ("Per-layer instruction counts are not measured (verify.qemu did not run, or ran with layers = false); "
            "the share column is each layer's share of the MACs, not of the time." if not measured else
            f"Instructions per layer counted on QEMU {speed['machine']} (mean over the verified inputs, in a build "
            f"that reads the board's counter after every kernel, to {_n(speed['layer_resolution_instructions'])} "
            f"instruction(s) per reading): {_n(speed['layers_instructions_sum'])} in all, against "
            f"{_n(speed['instructions_per_inference'])} for the whole inference of the plain build; the counting "
            f"build's hooks cost {_n(speed['trace_overhead_instructions'])} more. The share column is each layer's "
            "share of the MACs.")
    table = _table(head, body, left=(1, 2, 3, 4))
    return "\n".join(["<h2>Layers</h2>", f'<p class="note">{_e(note)} Arena offset: where the layer\'s output '
                      "lives in the static arena (the last layer writes the caller's output buffer).</p>",
                      f'<div class="scroll">{table}</div>',
                      _figure("layers", f"Instructions per layer (QEMU {speed['machine']}), by op" if measured else
                              "MACs per layer, by op", _plot_layers(rows, measured))])


def _schedule(memory: dict[str, Any]) -> str | None:
    """One sentence on plan-memory's schedule, when it is not the layer-by-layer one."""
    name = memory.get("schedule")
    if not name or name == "layer":
        return None
    inplace = memory.get("inplace_layers") or []
    text = f"Memory schedule {name}: {len(inplace)} layer(s) write their output over their input"
    patch = memory.get("patch")
    if isinstance(patch, dict) and patch.get("steps"):
        steps, tiles, tile = patch["steps"], patch.get("tiles", ["?", "?"]), patch.get("tile", ["?", "?"])
        text += (f"; steps {steps[0]}-{steps[-1]} run in {tiles[0]} x {tiles[1]} patches of {tile[0]} x {tile[1]} "
                 f"outputs, recomputing {_n(patch.get('extra_macs', 0))} MACs of halo")
    return f"{text}; its floor is {_n(memory.get('schedule_floor_bytes'))} B."


def _arena_section(facts: dict[str, Any]) -> str:
    arena = facts["arena"]
    if not arena["live_bytes"]:
        return ""
    text = (f"Planned arena {_n(arena['arena_bytes'])} B ({_e(arena['strategy'] or '')}); floor "
            f"{_n(arena['floor_bytes'])} B, the most bytes live at one step, which no plan that keeps each tensor "
            "in one place can go below.")
    if arena.get("schedule"):
        text += " " + _e(arena["schedule"])
    return "\n".join(["<h2>Arena</h2>", f"<p>{text}</p>",
                      _figure("arena", "Bytes live in the arena at each step", _plot_arena(arena))])


def _quantization_section(facts: dict[str, Any]) -> str:
    q = facts["quantization"]
    parts = ["<h2>Quantization</h2>"]
    if q["accuracy"]:
        parts.append(_table(["step", "metric", "FP32", "INT8", "change"],
                            [[_e(r["step"]), _e(r["metric"]), f"{r['fp32']:.4f}", f"{r['int8']:.4f}",
                              f"{r['int8'] - r['fp32']:+.4f}"] for r in q["accuracy"]], left=(0, 1)))
    else:
        parts.append("<p>No FP32 vs INT8 metrics were recorded.</p>")
    if q["layer_sqnr"] == "measured":
        summary = (f"Per-layer SQNR of the INT8 model against {_e(q['sqnr_reference'] or 'the float model')}, on "
                   f"{_e(q['sqnr_images'])} validation image(s): output {_db(q['output_sqnr_db'])}, lowest layer "
                   f"{_db(q['min_layer_sqnr_db'])}. A kernel computed together with the next one has no figure of its own.")
        parts += [f"<p>{summary}</p>", _figure("sqnr", "SQNR per layer (dB)", _plot_sqnr(facts["layers"]))]
    else:
        parts.append("<p>Per-layer SQNR: not measured (verify.host with sqnr_images = 0, or no verify.host).</p>")
    return "\n".join(parts)


def _training_section(facts: dict[str, Any]) -> str:
    curves = facts["training"]
    if not curves:
        return ("<h2>Training</h2><p>No per-epoch losses were recorded (no training step, or steps cached "
                "by an older distillc).</p>")
    rows = [[_e(c["label"]), str(len(c["losses"])), f"{c['losses'][0]:.4g}", f"{c['losses'][-1]:.4g}"] for c in curves]
    return "\n".join(["<h2>Training</h2>", _table(["step", "epochs", "first loss", "last loss"], rows, left=(0,)),
                      _figure("training", "Loss per epoch of each training step", _plot_training(curves))])


def _matryoshka_section(facts: dict[str, Any]) -> str:
    curves = facts["matryoshka"]
    if not curves:
        return ""
    dims = sorted({d for c in curves for d in c["dims"]})
    body = [[_e(c["label"])] + [f"{dict(zip(c['dims'], c['top1'])).get(d, float('nan')):.4f}" for d in dims]
            for c in curves]
    return "\n".join(["<h2>Matryoshka</h2>", _table(["top-1 at dim"] + [str(d) for d in dims], body, left=(0,)),
                      _figure("matryoshka", "Top-1 against embedding dim", _plot_matryoshka(curves))])


def _detection_section(facts: dict[str, Any]) -> str:
    d = facts.get("detection")
    if not d:
        return ""
    parts = ["<h2>Detection</h2>",
             f"<p>distillc_detect: {len(d['classes'] or [])} classes, dims {_e(str(d['dims']))}, "
             f"{d['grid']}x{d['grid']} cells at stride {d['stride']} px; {d['flash_bytes']} B of flash (class rows, "
             f"norms, tables), {d['scratch_bytes']} B of arena scratch.</p>"]
    body = [[_e(e["label"]), str(r["dim"]), _fmt(r["seen_map50"]), _fmt(r["unseen_map50"]),
             _fmt(r["random_unseen_map50"]), _fmt(r["map"])] for e in d["evals"] for r in e["rows"]]
    if body:
        parts.append(_table(["step", "dim", "mAP@0.5 seen", "mAP@0.5 unseen", "unseen, random classes",
                             "mAP@[.5:.95]"], body, left=(0,)))
        parts.append(_figure("detection", "mAP@0.5 against embedding dim (dashed: random class embeddings)",
                             _plot_detection(d["evals"])))
    for name, check in d["verification"].items():
        parts.append(f"<p>verify.{_e(name)}: distillc_detect equals the Python decoder on {check['decoded']} case(s): "
                     f"{_e(str(check['decoder_matches']))}; against onnxruntime's output "
                     f"{check['onnxruntime_identical']} identical, {check['onnxruntime_within_one_step']} within one "
                     f"step, {check['onnxruntime_differing']} differing.</p>")
    return "\n".join(parts)


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.3f}"


def _verification_section(facts: dict[str, Any]) -> str:
    v = facts["verification"]
    if not v:
        return "<h2>Verification</h2><p>The bundle was not verified.</p>"
    body = []
    for name, s in v.items():
        explained = (f"{_n(s['tie_differences'])} value(s) on float32 rounding ties, explained kernel by kernel "
                     f"({_n(s['kernels_checked'])} kernels checked, each within {s['kernel_max_lsb']} LSB)"
                     if s["explained"] else "none needed")
        body.append([_e(name) + (f" ({_e(s['machine'])})" if s["machine"] else ""), _e(s["images"]),
                     _e(s["max_lsb"]), f"{100 * s['exact_fraction']:.2f} %" if s["exact_fraction"] is not None else "",
                     _e(explained)])
    return "\n".join(["<h2>Verification</h2>",
                      "<p>The bundle's C against onnxruntime running the QCDQ model as written.</p>",
                      _table(["where", "images", "max LSB", "outputs exact", "explained differences"], body,
                             left=(0, 4))])


# -- tables -----------------------------------------------------------------------------------------


def _facts_table(rows: list[tuple[str, Any]]) -> str:
    return '<table class="facts">' + "".join(
        f'<tr><td>{_e(k)}</td><td class="l">{_e(v)}</td></tr>' for k, v in rows) + "</table>"


def _table(head: list[str], body: list[list[str]], left: tuple[int, ...] = ()) -> str:
    def cls(i: int) -> str:
        return ' class="l"' if i in left else ""

    out = ["<table><thead><tr>", *(f"<th{cls(i)}>{_e(h)}</th>" for i, h in enumerate(head)), "</tr></thead><tbody>"]
    for row in body:
        out.append("<tr>" + "".join(f"<td{cls(i)}>{c}</td>" for i, c in enumerate(row)) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _n(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and not value.is_integer():
        return f"{value:,.1f}"
    return f"{int(value):,}"


def _g(value: Any) -> str:
    return f"{value:g}" if isinstance(value, (int, float)) else str(value)


def _db(value: Any) -> str:
    return f"{value:.1f} dB" if isinstance(value, (int, float)) else "-"


def _shape(shape: Any) -> str:
    return "x".join(map(str, shape)) if isinstance(shape, list) else ""


# -- figures ----------------------------------------------------------------------------------------

_COLORS = ["#0969da", "#cf222e", "#1a7f37", "#8250df", "#bf8700", "#57606a", "#e16f24", "#116329"]


def _figure(name: str, caption: str, svg: str) -> str:
    return (f'<figure class="plot" id="fig-{name}">{svg}<figcaption>{_e(caption)}</figcaption></figure>')


def _svg(fig: Any, name: str) -> str:
    """The figure as inline SVG: text kept as text, ids salted by the figure's name (unique on
    the page, the same every time), no date."""
    import matplotlib

    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.hashsalt": f"distillc-{name}", "svg.fonttype": "none"}):
        # Fixed margins (_new_figure), not bbox_inches="tight": that draws every figure twice.
        fig.savefig(buffer, format="svg", metadata={"Date": None, "Creator": "distillc"})
    text = buffer.getvalue()
    return text[text.index("<svg"):]


def _new_figure(width: float, height: float, *, left: float = 0.9, right: float = 0.3, top: float = 0.3,
                bottom: float = 0.55) -> Any:
    """A figure on its own Agg canvas: no pyplot, so no global backend or figure manager is
    touched (a caller's interactive session keeps its own).  Margins in inches."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=72)
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=left / width, right=1 - right / width, top=1 - top / height, bottom=bottom / height)
    return fig


def _plot_budget(budget: dict[str, Any]) -> str:
    fig = _new_figure(8, 1.9, left=1.1)
    ax = fig.add_subplot()
    labels, used, total = [], [], []
    for name, label in (("flash", "flash"), ("ram", "RAM (arena)")):
        b = budget[name]
        labels.append(label)
        used.append(b["used_bytes"] / 1024)
        total.append((b["budget_bytes"] or 0) / 1024)
    y = range(len(labels))
    ax.barh(y, [t or u for t, u in zip(total, used)], color="#eaeef2", edgecolor="#8c959f", height=0.6,
            label="budget")
    ax.barh(y, used, color=_COLORS[0], height=0.6, label="used")
    for i, (u, t) in enumerate(zip(used, total)):
        text = f"{u:,.1f} KiB" + (f" of {t:,.0f} KiB ({100 * u / t:.1f} %)" if t else " (no budget set)")
        ax.text(max(t, u) * 1.01, i, text, va="center", fontsize=10)
    ax.set_yticks(list(y), labels)
    ax.invert_yaxis()
    ax.set_xlabel("KiB")
    ax.set_xlim(0, max(max(total), max(used), 1e-3) * 1.6)
    ax.spines[["top", "right"]].set_visible(False)
    return _svg(fig, "budget")


def _plot_layers(rows: list[dict[str, Any]], measured: bool = False) -> str:
    """Per layer, the instructions QEMU counted when ``measured``, else the MACs."""
    fig = _new_figure(10, 3.4, top=0.5)
    ax = fig.add_subplot()
    ops = list(dict.fromkeys(r["op"] for r in rows))
    color = {op: _COLORS[i % len(_COLORS)] for i, op in enumerate(ops)}
    x = [r["index"] for r in rows]
    key = "instructions" if measured else "macs"
    _bars(ax, x, [r[key] or 0 for r in rows], [color[r["op"]] for r in rows], len(rows))
    ax.set_xlabel("layer")
    ax.set_ylabel("instructions" if measured else "MACs")
    from matplotlib.patches import Patch

    handles = [Patch(color=color[op], label=str(op)) for op in ops]
    ax.legend(handles=handles, fontsize=8, loc="lower left", bbox_to_anchor=(0, 1.0), ncol=min(6, len(handles)),
              frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    return _svg(fig, "layers")


def _plot_arena(arena: dict[str, Any]) -> str:
    fig = _new_figure(10, 3)
    ax = fig.add_subplot()
    live = [b / 1024 for b in arena["live_bytes"]]
    ax.step(range(len(live)), live, where="mid", color=_COLORS[0], label="live")
    ax.fill_between(range(len(live)), live, step="mid", color=_COLORS[0], alpha=0.15)
    if arena["floor_bytes"] is not None:
        ax.axhline(arena["floor_bytes"] / 1024, color=_COLORS[2], linestyle="--", label="floor")
    if arena["arena_bytes"] is not None:
        ax.axhline(arena["arena_bytes"] / 1024, color=_COLORS[1], linestyle=":", label="planned arena")
    ax.set_xlabel("step (kernel)")
    ax.set_ylabel("KiB")
    ax.set_ylim(0, max(live + [(arena["arena_bytes"] or 0) / 1024]) * 1.15 or 1)
    ax.legend(fontsize=9, frameon=False, loc="upper right")
    ax.spines[["top", "right"]].set_visible(False)
    return _svg(fig, "arena")


def _plot_sqnr(rows: list[dict[str, Any]]) -> str:
    fig = _new_figure(10, 2.8)
    ax = fig.add_subplot()
    pts = [(r["index"], r["sqnr_db"]) for r in rows if r["sqnr_db"] is not None]
    _bars(ax, [p[0] for p in pts], [p[1] for p in pts], _COLORS[3], len(rows))
    ax.set_xlabel("layer")
    ax.set_ylabel("SQNR (dB)")
    ax.spines[["top", "right"]].set_visible(False)
    return _svg(fig, "sqnr")


def _bars(ax: Any, x: list[int], heights: list[float], colors: Any, count: int) -> None:
    """Bars at 0..count-1 as one line collection (one SVG path group, not a patch per bar: many
    times faster to draw for a network of a hundred layers)."""
    fig_width = ax.figure.get_figwidth() * ax.get_position().width * 72  # points
    ax.vlines(x, 0, heights, colors=colors, linewidth=max(0.5, 0.75 * fig_width / max(count, 1)))
    ax.set_xlim(-0.8, count - 0.2)
    ax.set_ylim(min(0.0, min(heights, default=0.0)) * 1.05, max(max(heights, default=1.0), 1e-9) * 1.05)


def _plot_training(curves: list[dict[str, Any]]) -> str:
    # One axes (one draw): each step's own loss, labelled; the table above gives first and last.
    fig = _new_figure(8, 3, right=3.2)
    ax = fig.add_subplot()
    for i, curve in enumerate(curves):
        epochs = range(1, len(curve["losses"]) + 1)
        ax.plot(epochs, curve["losses"], color=_COLORS[i % len(_COLORS)], marker="o", markersize=3,
                label=curve["label"])
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.spines[["top", "right"]].set_visible(False)
    return _svg(fig, "training")


def _plot_detection(evals: list[dict[str, Any]]) -> str:
    fig = _new_figure(8, 3, right=3.2)
    ax = fig.add_subplot()
    dims: set[int] = set()
    for i, e in enumerate(evals):
        color = _COLORS[i % len(_COLORS)]
        xs = [r["dim"] for r in e["rows"]]
        dims.update(xs)
        for key, style, what in (("seen_map50", "-", "seen"), ("unseen_map50", ":", "unseen"),
                                 ("random_unseen_map50", "--", "unseen, random classes")):
            ys = [r[key] if r[key] is not None else float("nan") for r in e["rows"]]
            ax.plot(xs, ys, linestyle=style, marker="o", color=color, label=f"{e['label']}: {what}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(dims), [str(d) for d in sorted(dims)])
    ax.set_xlabel("embedding dim")
    ax.set_ylabel("mAP@0.5")
    ax.legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.spines[["top", "right"]].set_visible(False)
    return _svg(fig, "detection")


def _plot_matryoshka(curves: list[dict[str, Any]]) -> str:
    fig = _new_figure(8, 3, right=3.2)
    ax = fig.add_subplot()
    for i, curve in enumerate(curves):
        ax.plot(curve["dims"], curve["top1"], marker="o", color=_COLORS[i % len(_COLORS)], label=curve["label"])
    dims = sorted({d for c in curves for d in c["dims"]})
    ax.set_xscale("log", base=2)
    ax.set_xticks(dims, [str(d) for d in dims])
    ax.set_xlabel("embedding dim")
    ax.set_ylabel("top-1")
    ax.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.spines[["top", "right"]].set_visible(False)
    return _svg(fig, "matryoshka")
