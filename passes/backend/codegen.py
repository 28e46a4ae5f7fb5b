"""C code generation (the ``codegen.c`` stage): TVM ``c`` kernels plus distillc's own executor.

The bundle needs no TVM runtime.  TVM's ``c`` target emits an exported function with the
TVM-FFI packed calling convention for every *public* PrimFunc, but a *private* PrimFunc whose
parameters are plain pointers (``T.handle`` + ``T.decl_buffer``) and that is called from
another PrimFunc comes out as an ordinary C function: ``void k(int8_t* a, ..., int8_t* out)``.
So each kernel is rewritten to pointer parameters, a throw-away public entry calls them all,
and only the kernel definitions are kept from the generated source.

Files written into ``bundle_dir``:

* ``include/distillc_model.h``  public API: sizes, shapes, quantization, the two run functions;
* ``src/distillc_kernels.c``    the kernels (pure integer C unless float fallback was allowed);
* ``src/distillc_weights.c``    every constant as a ``const`` array (flash);
* ``src/distillc_model.c``      the executor: one static arena, one call per kernel;
* ``src/distillc_model_float.c`` ``distillc_model_run_float`` (quantize in, dequantize out);
* ``src/distillc_internal.h``   kernel prototypes and weight declarations.

:func:`build_program` runs TVM (kernel C); :func:`emit_c` is pure Python, so a cached
:class:`Program` can be turned into a bundle without TVM.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from distillc.errors import PassError

from . import inplace, patch as patching
from .memory import MemoryPlan, extra_instructions, plan_memory
from .microkernels import micro_kernels_c
from .program import ACTIVATION, CONST, INPUT, OUTPUT, Program, extract_program

PREFIX = "distillc"
#: The activation arena's default linker section (``DISTILLC_ARENA_SECTION`` in distillc_model.c).
ARENA_SECTION = ".bss.distillc_arena"


@dataclass(frozen=True)
class CExtension:
    """C that a feature adds to a bundle, through :func:`emit_c` and nowhere else.

    The Matryoshka classifier (``distillc_classify``) is one; a detection decoder would be
    another.  ``declarations`` go into ``include/distillc_model.h`` after the model's own API
    (inside its ``extern "C"`` block, so they may use every macro of the header); ``sources``
    are bundle-relative paths (under ``src/``) and their text, compiled with the rest of the
    bundle; ``manifest`` is stored under ``manifest[name]``, and ``flash_bytes`` is added to
    ``manifest["memory"]["<name>_bytes"]`` and counted against the flash budget.
    ``arena_scratch_bytes``: RAM the extension's functions use *between* inferences (the
    detection decoder's candidates).  They get it from the activation arena, which holds nothing
    live then: :func:`emit_c` places a model output (``DISTILLC_OUTPUT_SIZE`` bytes) at
    ``DISTILLC_ARENA_OUTPUT_OFFSET``, where no tensor the executor reads after writing its output
    lies (so ``distillc_model_run(input, distillc_arena_base() + DISTILLC_ARENA_OUTPUT_OFFSET)``
    is safe), and the scratch at ``DISTILLC_ARENA_SCRATCH_OFFSET``, beside that output; the arena
    grows only if both do not fit (``distillc_internal.h`` declares the macros and
    ``uint8_t *distillc_arena_base(void)``; the manifest's ``memory.arena_share``).
    A pass provides one through ``c_extension`` (see ``distillc.passes.backend.codegen_c``).
    """

    name: str
    declarations: str
    sources: dict[str, str] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)
    flash_bytes: int = 0
    arena_scratch_bytes: int = 0


@dataclass(frozen=True)
class ArenaShare:
    """Where bundle extensions may put a model output and their scratch in the arena (bytes)."""

    output_offset: int
    scratch_offset: int
    scratch_bytes: int
    arena_bytes: int  # the arena that holds the plan's tensors, that output and the scratch

    def to_dict(self, planned_bytes: int) -> dict[str, int]:
        return {"output_offset": self.output_offset, "scratch_offset": self.scratch_offset,
                "scratch_bytes": self.scratch_bytes, "planned_bytes": int(planned_bytes)}


def arena_share(prog: Program, plan: MemoryPlan, scratch_bytes: int) -> ArenaShare:
    """The lowest 8-aligned offset for the model output that overlaps no tensor live from the step
    that writes the output on, and the lowest one for ``scratch_bytes`` beside that output."""
    out_bytes = int(np.prod(prog.quant["output"]["shape"]))
    writer = min((s.index for s in prog.steps if prog.tensor(s.out).kind == OUTPUT), default=0)
    busy = sorted((plan.offsets[t], plan.offsets[t] + prog.tensor(t).nbytes)
                  for t, (_, last) in prog.lifetimes().items() if last >= writer and t in plan.offsets)

    def lowest(size: int, taken: list[tuple[int, int]]) -> int:
        for start in [0] + [_align8(end) for _, end in taken]:
            if all(start + size <= a or start >= b for a, b in taken):
                return start
        raise AssertionError("unreachable: the end of the last range is free")

    output_offset = lowest(out_bytes, busy)
    scratch_offset = lowest(int(scratch_bytes), [(output_offset, output_offset + out_bytes)])
    arena = max(int(plan.arena_bytes), output_offset + out_bytes, scratch_offset + int(scratch_bytes))
    return ArenaShare(output_offset, scratch_offset, int(scratch_bytes), arena)


def _align8(n: int) -> int:
    return (int(n) + 7) // 8 * 8

_C_TYPES = {
    "int8": "int8_t", "uint8": "uint8_t", "int16": "int16_t", "uint16": "uint16_t",
    "int32": "int32_t", "uint32": "uint32_t", "int64": "int64_t", "uint64": "uint64_t",
    "float32": "float", "bool": "bool",
}


def build_program(mod, *, pass_name: str = "tvm.int8") -> Program:
    """The kernel call sequence of a lowered module, with every kernel generated as C.

    The result no longer needs TVM (see :meth:`Program.save`); kernels are named
    ``distillc_kNN_<op>`` in order of first call.
    """
    prog = extract_program(mod, pass_name=pass_name)
    kernel_names = _kernel_names(prog)
    names = {gvar.name_hint for gvar in mod.get_global_vars()}
    variant_names = {tvm_name + inplace.SUFFIX: c_name + inplace.SUFFIX for tvm_name, c_name in kernel_names.items()
                     if tvm_name + inplace.SUFFIX in names}
    prog.kernels_c, prog.signatures = build_kernels(mod, prog, kernel_names, pass_name=pass_name,
                                                    variants=variant_names, variant_sources=prog.variants)
    for step in prog.steps:
        variant = variant_names.get(step.kernel + inplace.SUFFIX)
        step.kernel = kernel_names[step.kernel]
        if variant is not None:
            # the layer kernel itself when its C is the in-place kernel's (same raster order)
            same = prog.variants[variant].replace(variant, step.kernel) == _extract_function(
                prog.kernels_c, step.kernel, pass_name)
            step.inplace_kernel = step.kernel if same else variant
    used = {step.inplace_kernel for step in prog.steps}
    prog.variants = {k: v for k, v in prog.variants.items() if k in used}
    return prog


def emit_c(prog: Program, bundle_dir, *, name: str, plan: MemoryPlan | None = None,
           pass_name: str = "codegen.c", extensions: Iterable[CExtension] = ()) -> dict:
    """Write the bundle's C sources for ``prog`` into ``bundle_dir``; return the manifest dict.

    Pure Python: the kernels were generated by :func:`build_program`.  ``extensions`` add their
    declarations to the public header and their sources to ``src/`` (see :class:`CExtension`).
    """
    extensions = list(extensions)
    if not prog.kernels_c:
        raise PassError(pass_name, "the program has no generated kernels (run build_program)")
    if plan is None:
        plan = plan_memory(prog, pass_name=pass_name)
    scratch = max((int(ext.arena_scratch_bytes) for ext in extensions), default=0)
    share = arena_share(prog, plan, scratch) if any(ext.arena_scratch_bytes for ext in extensions) else None
    planned = plan
    if share is not None:  # the arena the header declares and the executor defines
        plan = dataclasses.replace(plan, arena_bytes=share.arena_bytes)
    bundle_dir = Path(bundle_dir)
    (bundle_dir / "include").mkdir(parents=True, exist_ok=True)
    (bundle_dir / "src").mkdir(parents=True, exist_ok=True)
    weight_names = {t.id: f"{PREFIX}_w{i}" for i, t in enumerate(
        t for t in prog.tensors if t.kind == CONST)}
    kernels_c, signatures = _scheduled_kernels(prog, plan, pass_name)
    files = {
        "include/distillc_model.h": _public_header(prog, plan, name, extensions),
        "src/distillc_internal.h": _internal_header(prog, signatures, weight_names, name, share),
        "src/distillc_kernels.c": _kernels_file(kernels_c, name),
        "src/distillc_weights.c": _weights_file(prog, weight_names, name),
        "src/distillc_model.c": _executor_file(prog, plan, signatures, weight_names, name, share),
        "src/distillc_model_float.c": _float_api_file(name),
    }
    for ext in extensions:
        for rel, text in ext.sources.items():
            if rel in files or not rel.startswith("src/"):
                raise PassError(pass_name, f"bundle extension {ext.name!r} writes {rel!r}, which is not a new "
                                           "file under src/")
            files[rel] = text
    for rel, text in files.items():
        (bundle_dir / rel).write_text(text, encoding="utf-8", newline="\n")
    entries = manifest(prog, planned, files=sorted(files))
    if share is not None:
        entries["memory"]["arena_bytes"] = int(share.arena_bytes)
        entries["memory"]["arena_share"] = share.to_dict(planned.arena_bytes)
    for ext in extensions:
        entries[ext.name] = dict(ext.manifest)
        entries["memory"][f"{ext.name}_bytes"] = int(ext.flash_bytes)
    return entries


# ----------------------------------------------------------------------------------------------
# Kernels


def _scheduled_kernels(prog: Program, plan: MemoryPlan, pass_name: str) -> tuple[str, dict]:
    """The kernel definitions and signatures the plan's schedule calls: the program's, plus the
    in-place variants of the steps the plan runs in place (when they are not the layer kernels)."""
    source, signatures = prog.kernels_c, dict(prog.signatures)
    for index in sorted(plan.inplace):
        step = prog.steps[index]
        kernel = step.inplace_kernel
        if not kernel:
            raise PassError(pass_name, f"the plan runs step {index} ({step.name}) in place, which has no "
                                       "in-place kernel")
        if kernel not in signatures:
            source += "\n" + prog.variants[kernel]
            signatures[kernel] = list(signatures[step.kernel])
    if plan.patch:
        stage = prog.steps[:plan.patch["last"] + 1]
        if len(plan.patch.get("kernels", {})) != len(stage) or any(
                name not in prog.variants for name in plan.patch["kernels"].values()):
            raise PassError(pass_name, "the plan runs the first stage in patches but the program has no tile "
                                       "kernels for it (patch.attach_kernels; the plan-memory pass makes them)")
        for step in stage:
            kernel = plan.patch["kernels"][str(step.index)]
            if kernel not in signatures:
                source += "\n" + prog.variants[kernel]
                signatures[kernel] = list(signatures[step.kernel])
        called = {_step_kernel(step, plan) for step in prog.steps[len(stage):]}
        for kernel in dict.fromkeys(step.kernel for step in stage):
            if kernel not in called:  # a layer kernel only the patched steps had: not in the bundle
                source = source.replace(_extract_function(source, kernel, pass_name), "", 1)
                del signatures[kernel]
    return source, signatures


def _step_kernel(step, plan: MemoryPlan) -> str:
    """The C kernel a step calls under the plan's schedule."""
    if plan.patch and step.index <= plan.patch["last"]:
        return plan.patch["kernels"][str(step.index)]
    return step.inplace_kernel if step.index in plan.inplace else step.kernel


def _planned(prog: Program, plan: MemoryPlan) -> Program:
    """The program as the plan's schedule runs it (its tensors are the plan's offsets' keys)."""
    return patching.view(prog, plan.patch) if plan.patch else prog


def _kernel_names(prog: Program) -> dict:
    """TVM kernel name -> C function name, numbered in order of first call."""
    names: dict[str, str] = {}
    for step in prog.steps:
        if step.kernel not in names:
            op = re.sub(r"[^0-9a-z_]+", "_", step.op.lower()).strip("_") or "kernel"
            names[step.kernel] = f"{PREFIX}_k{len(names):02d}_{op}"
    return names


def build_kernels(mod, prog: Program, kernel_names: dict, *, pass_name: str = "codegen.c",
                  variants: dict | None = None, variant_sources: dict | None = None):
    """Generate C for every kernel with TVM's ``c`` target.

    Returns ``(source, signatures)``: the concatenated kernel definitions and, per C name, the
    list of C parameter types (``int8_t *`` ...).  ``variants`` (TVM name -> C name of a kernel
    called as the step kernel whose name it extends, e.g. ``<kernel>_inplace``) are generated too,
    their definitions put into ``variant_sources`` (C name -> definition), not into the source.
    """
    import tvm
    from tvm import tirx

    first_step = {}
    for step in prog.steps:
        first_step.setdefault(step.kernel, step)
    funcs = {}
    entry_params, calls, signatures = [], [], {}
    variants = dict(variants or {})
    base_of = {v: v.removesuffix(inplace.SUFFIX) for v in variants}  # a variant's step kernel
    for tvm_name, c_name in [*kernel_names.items(), *variants.items()]:
        prim = mod[tvm_name]
        step = first_step[base_of.get(tvm_name, tvm_name)]
        roles = [_role(prog.tensor(t).kind, i) for i, t in enumerate(step.args)] + ["out"]
        if len(roles) != len(prim.params):
            raise RuntimeError(f"{pass_name}: kernel {tvm_name} takes {len(prim.params)} buffers "
                               f"but is called with {len(roles)}")
        kernel, types = _pointer_params(prim, roles)
        if tvm_name not in variants:
            signatures[c_name] = types
        gvar = tvm.ir.GlobalVar(c_name)
        funcs[gvar] = kernel
        handles = [tirx.Var(f"{c_name}_{r}", p.ty) for r, p in zip(roles, kernel.params)]
        entry_params.extend(handles)
        calls.append(tirx.Evaluate(tvm.ir.Call(gvar, handles, ret_ty="void")))
    entry = tirx.PrimFunc(entry_params, tirx.SeqStmt(calls) if len(calls) > 1 else calls[0])
    funcs[tvm.ir.GlobalVar(f"{PREFIX}_entry")] = entry.with_attr("global_symbol", f"{PREFIX}_entry")
    with tvm.transform.PassContext(opt_level=3, config={"tirx.disable_assert": True}):
        try:
            lib = tvm.tirx.build(tvm.IRModule(funcs), target="c")
        except Exception as err:
            raise RuntimeError(f"{pass_name}: TVM's C backend failed: {err}") from err
    source = lib.inspect_source()
    parts = [_extract_function(source, c_name, pass_name) for c_name in kernel_names.values()]
    if variant_sources is not None:
        for c_name in variants.values():
            variant_sources[c_name] = _extract_function(source, c_name, pass_name)
    return "\n".join(parts), signatures

def _role(kind: str, index: int) -> str:
    return f"w{index}" if kind == CONST else f"in{index}"


def _pointer_params(prim, roles):
    """The PrimFunc with each Buffer parameter replaced by a typed pointer + ``decl_buffer``."""
    import tvm
    from tvm import tirx

    params, decls, types = [], [], []
    for role, buf in zip(roles, prim.params):
        dtype = str(buf.dtype)
        handle = tirx.Var(role, tvm.ir.PointerType(tvm.ir.PrimType(dtype), "global"))
        params.append(handle)
        decls.append(tirx.DeclBuffer(buf, data=handle))
        types.append(f"{_C_TYPES[dtype]} *")
    attrs = {k: v for k, v in prim.attrs.items() if k != "global_symbol"} if prim.attrs else {}
    kernel = tirx.PrimFunc(params, tirx.SeqStmt(decls + [prim.body]))
    for key, value in attrs.items():
        kernel = kernel.with_attr(key, value)
    return kernel, types


def _extract_function(source: str, c_name: str, pass_name: str) -> str:
    """Cut one function definition out of TVM's generated C and make it self-contained."""
    lines = source.splitlines()
    start = None
    for i, line in enumerate(lines):
        if re.match(rf"^(TVM_DLL )?void {re.escape(c_name)}\(.*\) \{{$", line):
            start = i
            break
    if start is None:
        raise RuntimeError(f"{pass_name}: kernel {c_name} missing from TVM's generated C")
    end = lines.index("}", start)
    body = lines[start:end + 1]
    body[0] = body[0].replace("TVM_DLL ", "")
    text = "\n".join(body) + "\n"
    if re.search(r"\bTVM\w*|\btvm\w*|__tvm", text):
        raise RuntimeError(f"{pass_name}: kernel {c_name} still calls into the TVM runtime")
    return text


# ----------------------------------------------------------------------------------------------
# Files


def _banner(name: str, what: str) -> str:
    return f"/* {what} of distillc model \"{name}\". Generated by distillc; do not edit. */\n"


def _c_float(value: float) -> str:
    text = np.format_float_scientific(np.float32(value), unique=True, trim="0")
    if "e" not in text:
        text += "e+00"
    mantissa, exp = text.split("e")
    if "." not in mantissa:
        mantissa += ".0"
    elif mantissa.endswith("."):
        mantissa += "0"
    return f"{mantissa}e{exp}f"


def _public_header(prog: Program, plan: MemoryPlan, name: str, extensions: Iterable[CExtension] = ()) -> str:
    inp, out = prog.quant["input"], prog.quant["output"]
    extra = "".join(f"\n{ext.declarations.rstrip()}\n" for ext in extensions)
    weights = sum(t.nbytes for t in prog.tensors if t.kind == CONST)

    def shape_macros(prefix, quant):
        shape = quant["shape"]
        lines = [
            f"#define DISTILLC_{prefix}_SIZE {int(np.prod(shape))}",
            f"#define DISTILLC_{prefix}_RANK {len(shape)}",
            f"#define DISTILLC_{prefix}_SHAPE {{{', '.join(str(d) for d in shape)}}}",
        ]
        lines += [f"#define DISTILLC_{prefix}_DIM{i} {d}" for i, d in enumerate(shape)]
        lines += [
            f"#define DISTILLC_{prefix}_SCALE {_c_float(quant['scale'])}",
            f"#define DISTILLC_{prefix}_ZERO_POINT ({int(quant['zero_point'])})",
        ]
        return "\n".join(lines)

    return f"""{_banner(name, "Public C API")}#ifndef DISTILLC_MODEL_H
#define DISTILLC_MODEL_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {{
#endif

#define DISTILLC_MODEL_NAME "{_c_string(name)}"

/* Input: int8, row-major in the model's layout; real value = (q - ZERO_POINT) * SCALE. */
{shape_macros("INPUT", inp)}

/* Output: int8, row-major; real value = (q - ZERO_POINT) * SCALE. */
{shape_macros("OUTPUT", out)}

/* RAM: one static arena for all activations (lower bound {plan.floor_bytes} bytes). */
#define DISTILLC_ARENA_BYTES {plan.arena_bytes}
/* Flash: weights, biases and requantization multipliers. */
#define DISTILLC_WEIGHTS_BYTES {weights}

/* Runs the model on one int8 input. Returns 0 on success, -1 if a pointer is NULL.
 * Not reentrant: the activation arena is static. */
int distillc_model_run(const int8_t *input, int8_t *output);

/* Quantizes a float input with the input scale/zero point, runs the model and dequantizes
 * the output. Returns what distillc_model_run returns. Uses DISTILLC_INPUT_SIZE +
 * DISTILLC_OUTPUT_SIZE bytes of static RAM besides the arena. */
int distillc_model_run_float(const float *input, float *output);
{extra}
#ifdef __cplusplus
}}
#endif

#endif /* DISTILLC_MODEL_H */
"""


def _c_string(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def _internal_header(prog: Program, signatures: dict, weight_names: dict, name: str,
                     share: ArenaShare | None = None) -> str:
    lines = [_banner(name, "Kernel and weight declarations").rstrip(), "#ifndef DISTILLC_INTERNAL_H",
             "#define DISTILLC_INTERNAL_H", "", "#include <stdint.h>", ""]
    for c_name, types in signatures.items():
        params = ", ".join(types)
        lines.append(f"void {c_name}({params});")
    lines.append("")
    for tid, wname in weight_names.items():
        t = prog.tensor(tid)
        lines.append(f"extern const {_C_TYPES[t.dtype]} {wname}[{max(1, t.data.size)}];")
    if share is not None:
        lines += ["", "/* The arena between inferences, for the bundle's extensions (codegen.CExtension):",
                  " * distillc_model_run may write its output at DISTILLC_ARENA_OUTPUT_OFFSET (no tensor it",
                  " * reads after writing the output lies there); DISTILLC_ARENA_SCRATCH_BYTES at",
                  " * DISTILLC_ARENA_SCRATCH_OFFSET overlap neither that output nor anything live later. */",
                  f"#define DISTILLC_ARENA_OUTPUT_OFFSET {share.output_offset}",
                  f"#define DISTILLC_ARENA_SCRATCH_OFFSET {share.scratch_offset}",
                  f"#define DISTILLC_ARENA_SCRATCH_BYTES {share.scratch_bytes}",
                  "uint8_t *distillc_arena_base(void);"]
    lines += ["", "#ifdef DISTILLC_TRACE",
              "/* Debug builds only (-DDISTILLC_TRACE): called after every kernel with its output. */",
              "void distillc_trace(int step, const void *data, unsigned long bytes);", "#endif", "",
              "#endif /* DISTILLC_INTERNAL_H */", ""]
    return "\n".join(lines)


def _kernels_file(kernel_src: str, name: str) -> str:
    return (f"{_banner(name, 'Kernels (TVM c target)')}"
            "#include <math.h>\n#include <stdbool.h>\n#include <stdint.h>\n\n"
            '#include "distillc_internal.h"\n\n' + micro_kernels_c(kernel_src) + kernel_src)


def _weights_file(prog: Program, weight_names: dict, name: str) -> str:
    out = [_banner(name, "Weights, biases and requantization multipliers (flash)"),
           '#include <stdint.h>\n\n#include "distillc_internal.h"\n']
    for tid, wname in weight_names.items():
        t = prog.tensor(tid)
        flat = np.asarray(t.data).reshape(-1)
        if flat.size == 0:
            flat = np.zeros(1, dtype=t.data.dtype)
        shape = "x".join(str(d) for d in t.shape) or "scalar"
        out.append(f"\n/* {t.dtype} {shape} */\n")
        out.append(f"const {_C_TYPES[t.dtype]} {wname}[{flat.size}] = {{\n")
        items = [_c_literal(v, t.dtype) for v in flat.tolist()]
        per_line = 16 if t.dtype in ("int8", "uint8", "int16") else 8
        for i in range(0, len(items), per_line):
            out.append("    " + ", ".join(items[i:i + per_line]) + ",\n")
        out.append("};\n")
    return "".join(out)


def _c_literal(value, dtype: str) -> str:
    if dtype == "float32":
        return _c_float(value)
    if dtype == "bool":
        return "1" if value else "0"
    value = int(value)
    if dtype == "int64":
        return "(-9223372036854775807LL - 1)" if value == -(2**63) else f"{value}LL"
    if dtype == "int32" and value == -(2**31):
        return "(-2147483647 - 1)"
    if dtype.startswith("uint") and dtype != "uint8":
        return f"{value}u"
    return str(value)


def _executor_file(prog: Program, plan: MemoryPlan, signatures: dict, weight_names: dict,
                   name: str, share: ArenaShare | None = None) -> str:
    uses_arena = plan.arena_bytes > 0
    lines = [_banner(name, "Ahead-of-time executor").rstrip(),
             "#include <stddef.h>", "#include <stdint.h>", "",
             '#include "distillc_model.h"', '#include "distillc_internal.h"', ""]
    if uses_arena:
        lines += [
            f"/* Every activation lives at a planned offset of this arena ({plan.arena_bytes} bytes;",
            f" * the largest set of tensors alive at one step needs {plan.floor_bytes} bytes).",
            " * It sits in its own linker section, DISTILLC_ARENA_SECTION, so a linker script can put it",
            " * in a memory bank of its choice (the STM32 targets' scripts: DTCM or CCM when it fits).",
            " * Define DISTILLC_ARENA_SECTION (a string literal) when compiling this file to use another",
            " * section; the default's \".bss.\" prefix makes it zero-filled (no flash) and lets any",
            " * linker script that places .bss.* place it too. */",
            "#if !defined(DISTILLC_ARENA_SECTION) && defined(__ELF__)",
            f"#define DISTILLC_ARENA_SECTION \"{ARENA_SECTION}\"",
            "#endif",
            "#if defined(DISTILLC_ARENA_SECTION) && (defined(__GNUC__) || defined(__clang__))",
            "#define DISTILLC_ARENA_PLACEMENT __attribute__((section(DISTILLC_ARENA_SECTION)))",
            "#else",
            "#define DISTILLC_ARENA_PLACEMENT",
            "#endif",
            "static union {",
            "    uint8_t bytes[DISTILLC_ARENA_BYTES];",
            "    int64_t align;",
            "} distillc_arena DISTILLC_ARENA_PLACEMENT;",
            "",
        ]
    if plan.patch:
        lines += [patching.FRAME_C]
    if share is not None:
        lines += ["/* For the bundle's extensions (see distillc_internal.h). */",
                  "uint8_t *distillc_arena_base(void)", "{", "    return distillc_arena.bytes;", "}", ""]
    lines += ["int distillc_model_run(const int8_t *input, int8_t *output)", "{"]
    if plan.offsets:
        lines += ["    uint8_t *const arena = distillc_arena.bytes;", ""]
    lines += ["    if (input == NULL || output == NULL) {", "        return -1;", "    }"]
    planned = _planned(prog, plan)
    if plan.patch:
        lines += patching.stage_lines(prog, planned, plan.patch, signatures,
                                      lambda t: _pointer_expr(t, plan, weight_names))
    for step in planned.steps[plan.patch["last"] + 1 if plan.patch else 0:]:
        c_name = _step_kernel(step, plan)
        types = signatures[c_name]
        in_shape = _first_activation_shape(prog, step)
        out_t = prog.tensor(step.out)
        in_place = f", in place ({plan.inplace[step.index]} B below its input)" if step.index in plan.inplace else ""
        lines.append(f"    /* {step.index}: {step.op} {step.name}: {in_shape} -> {out_t.shape}{in_place} */")
        args = []
        for ctype, tid in zip(types, list(step.args) + [step.out]):
            args.append(f"({ctype.strip()}){_pointer_expr(prog.tensor(tid), plan, weight_names)}")
        lines.append(f"    {c_name}({', '.join(args)});")
        out_ptr = _pointer_expr(out_t, plan, weight_names)
        lines += ["#ifdef DISTILLC_TRACE",
                  f"    distillc_trace({step.index}, {out_ptr}, {out_t.nbytes}UL);",
                  "#endif"]
    lines += ["    return 0;", "}", ""]
    return "\n".join(lines)


def _first_activation_shape(prog: Program, step) -> tuple:
    shapes = step.arg_shapes or [prog.tensor(t).shape for t in step.args]
    for tid, shape in zip(step.args, shapes):
        if prog.tensor(tid).kind != CONST:
            return tuple(shape)
    return ()


def _pointer_expr(tensor, plan: MemoryPlan, weight_names: dict) -> str:
    if tensor.kind == INPUT:
        return "input"
    if tensor.kind == OUTPUT:
        return "output"
    if tensor.kind == CONST:
        return weight_names[tensor.id]
    if tensor.kind == ACTIVATION:
        return f"(arena + {plan.offsets[tensor.id]})"
    raise ValueError(tensor.kind)


def _float_api_file(name: str) -> str:
    return f"""{_banner(name, "Float convenience API")}#include <stdint.h>

#include "distillc_model.h"

/* Round half to even (as onnxruntime's QuantizeLinear does), without libm. */
static int32_t distillc_round_half_even(float value)
{{
    int32_t whole;
    float frac;

    if (!(value == value)) {{
        return 0;
    }}
    if (value > 1.0e6f) {{
        value = 1.0e6f;
    }} else if (value < -1.0e6f) {{
        value = -1.0e6f;
    }}
    whole = (int32_t)value;
    frac = value - (float)whole;
    if (frac > 0.5f || (frac == 0.5f && (whole & 1))) {{
        whole += 1;
    }} else if (frac < -0.5f || (frac == -0.5f && (whole & 1))) {{
        whole -= 1;
    }}
    return whole;
}}

int distillc_model_run_float(const float *input, float *output)
{{
    static int8_t quantized_input[DISTILLC_INPUT_SIZE];
    static int8_t quantized_output[DISTILLC_OUTPUT_SIZE];
    int32_t i;
    int status;

    if (input == 0 || output == 0) {{
        return -1;
    }}
    for (i = 0; i < DISTILLC_INPUT_SIZE; ++i) {{
        int32_t q = distillc_round_half_even(input[i] / DISTILLC_INPUT_SCALE) + DISTILLC_INPUT_ZERO_POINT;
        quantized_input[i] = (int8_t)(q < -128 ? -128 : (q > 127 ? 127 : q));
    }}
    status = distillc_model_run(quantized_input, quantized_output);
    if (status != 0) {{
        return status;
    }}
    for (i = 0; i < DISTILLC_OUTPUT_SIZE; ++i) {{
        output[i] = (float)((int32_t)quantized_output[i] - DISTILLC_OUTPUT_ZERO_POINT) * DISTILLC_OUTPUT_SCALE;
    }}
    return 0;
}}
"""


# ----------------------------------------------------------------------------------------------
# Manifest


def _patch_entry(patch: dict) -> dict | None:
    """The manifest's ``memory.patch``: which steps run in patches, how many, and what it costs."""
    if not patch:
        return None
    return {"steps": list(range(patch["last"] + 1)), "tiles": list(patch["tiles"]), "tile": list(patch["tile"]),
            "extra_macs": int(patch["extra_macs"]), "kernels": [patch["kernels"][k] for k in sorted(patch["kernels"], key=int)]}


def manifest(prog: Program, plan: MemoryPlan, files=()) -> dict:
    """The bundle's manifest entries (the lead adds versions, spec hash and verification)."""
    layers = []
    planned = _planned(prog, plan)  # a patched stage's steps write tiles
    spans = planned.lifetimes()
    for step, run in zip(prog.steps, planned.steps):
        out_t = prog.tensor(step.out)
        written = planned.tensor(run.out)
        in_arena = written.kind == ACTIVATION and run.out in plan.offsets  # else the caller's output buffer
        layers.append({
            "name": step.name,
            "node": step.node,
            "op": step.op,
            "input_shape": list(_first_activation_shape(prog, step)),
            "output_shape": list(out_t.shape),
            "macs": int(step.macs),
            "weight_bytes": int(sum(prog.tensor(t).nbytes for t in step.args
                                    if prog.tensor(t).kind == CONST)),
            "weights": dict(step.weights) if step.weights else None,  # bits, values, bytes stored
            "kernel": _step_kernel(step, plan),
            # bytes the output starts below the input when the layer runs in place, else null
            "inplace_shift_bytes": int(plan.inplace[step.index]) if step.index in plan.inplace else None,
            "arena_offset": int(plan.offsets[run.out]) if in_arena else None,
            "arena_bytes": int(written.nbytes) if in_arena else 0,
            # the output tile's shape when the step runs in patches, else null
            "patch_tile_shape": list(written.shape) if plan.patch and step.index <= plan.patch["last"] else None,
        })
    weights = sum(t.nbytes for t in prog.tensors if t.kind == CONST)
    extra = extra_instructions(prog, plan)
    basis = ("exact: the same kernels as the layer schedule, no copies" if extra == 0 else
             f"not estimated: the first stage runs in patches, {plan.patch['extra_macs']} MACs of halo "
             "recomputed, plus the tile copies (benchmarks/kernels.py measures them)" if plan.patch else
             "not estimated: in-place kernels differ from the layer kernels (verify.qemu's per-layer "
             "counts or benchmarks/kernels.py measure them)")
    # Bytes of the arena in use while each kernel runs (the timeline whose maximum is the floor).
    live = [int(sum(planned.tensor(t).nbytes for t, (a, b) in spans.items() if a <= step.index <= b))
            for step in prog.steps]
    return {
        "input": dict(prog.quant["input"]),
        "output": dict(prog.quant["output"]),
        "memory": {
            "arena_bytes": int(plan.arena_bytes),
            "arena_floor_bytes": int(plan.floor_bytes),
            "weights_bytes": int(weights),
            "arena_above_floor": bool(plan.above_floor),
            "plan_strategy": plan.strategy,
            "live_bytes": live,
            "schedule": plan.schedule,
            "schedule_floor_bytes": int(plan.bound_bytes),
            "inplace_layers": sorted(int(i) for i in plan.inplace),
            "patch": _patch_entry(plan.patch),
            "schedule_extra_instructions": extra,
            "schedule_extra_instructions_basis": basis,
        },
        "layers": layers,
        "kernels": len({_step_kernel(step, plan) for step in prog.steps}),
        "macs": int(sum(step.macs for step in prog.steps)),
        "float_fallback": list(prog.quant.get("float_fallback", [])),
        "files": list(files),
    }
