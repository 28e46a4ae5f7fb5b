"""Patch-based execution of the first stage (``plan-memory``'s ``patch`` schedule; MCUNetV2).

The first layers of a vision network work on its largest maps, so they set the arena: a
MobileNetV2 expansion at full resolution holds more bytes than anything later.  Under the
``patch`` schedule those layers (the *stage*: steps ``0 .. last``) run once per spatial tile of
the stage's output instead of once over the whole map.  Each tile's input region, grown by the
windows of the layers before it (the *halo*, recomputed by neighbouring tiles), is cut out of
the model input; every layer then runs on a tile-sized buffer, and the last one's tile is stored
into the stage's output, the only full-size tensor of the stage.  The intermediate tensors shrink
to tiles, at the cost of the halo's multiply-accumulates (``extra_macs``) and the copies.

Exactness: the tile kernels are the stage's layers lowered again from the same QCDQ ONNX with
tile-sized inputs and *no padding* (:func:`attach_kernels`; their constants must equal the layer
kernels', so they read the same weight arrays).  A layer's padding is its input's zero point, so
after each tile kernel the elements of its output tile that lie outside the map are set to that
zero point (``distillc_patch_frame``): the next layer then reads exactly what the padded layer
reads, at every element inside the map.  Elements outside the map are never stored.

Geometry: output tile origin ``o`` (in stage-output pixels) maps to the origin of the tile of
stage tensor ``j`` as ``o * scale[j] + offset[j]``; a layer with stride ``s``, window ``k``,
dilation ``d`` and top/left padding ``p`` turns ``(scale, offset, size)`` of its output into
``(scale * s, offset * s - p, (size - 1) * s + (k - 1) * d + 1)`` of its input.  Tiles have one
size; the last tile of a row or column is moved back to end at the map's edge (it recomputes
outputs its neighbour stored, with the same values).

The stage is a chain: step 0 reads the model input, each later step reads the one before it
and nothing else does; every stage tensor holds one byte per element and every step is a conv
(any window, depthwise or not).  ``plan-memory`` tries every chain prefix and 2x2 .. 4x4 tiles and
keeps the smallest floor (``memory._plan_patch``).
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np

from distillc.errors import PassError

from .program import ACTIVATION, CONST, Program

#: Tiles per side that ``plan-memory`` tries.
TILE_COUNTS = (2, 3, 4)
#: The stage tile kernels' C names: ``distillc_pNN_<op>`` (a layer kernel is ``distillc_kNN_<op>``).
KERNEL_PREFIX = "distillc_p"
_OPS = ("conv2d", "depthwise_conv2d")


def chain_end(prog: Program) -> int:
    """The last step of the longest prefix that can run in patches (-1: none; see the module doc)."""
    spans = prog.lifetimes()
    last = -1
    previous = prog.input_id
    for step in prog.steps:
        reads = [t for t in step.args if prog.tensor(t).kind != CONST]
        out = prog.tensor(step.out)
        if step.op not in _OPS or not step.conv or reads != [previous] or step.args.count(previous) != 1:
            break
        src = prog.tensor(previous)
        if len(src.shape) != 4 or len(out.shape) != 4 or src.shape[0] != 1 or out.shape[0] != 1:
            break
        if np.dtype(src.dtype).itemsize != 1 or np.dtype(out.dtype).itemsize != 1:
            break
        if previous != prog.input_id and spans[previous] != (step.index - 1, step.index):
            break  # an intermediate read by another step too
        last = step.index
        if out.kind != ACTIVATION:
            break
        previous = step.out
    return last


def geometry(prog: Program, last: int, tiles: int) -> dict:
    """The patch description of steps ``0 .. last`` in ``tiles`` x ``tiles`` tiles (see the module
    doc); ``tensors[j]`` is stage tensor ``j`` (0: the model input, ``last + 1``: the stage output)."""
    steps = prog.steps[:last + 1]
    out = prog.tensor(steps[-1].out)
    height, width = int(out.shape[2]), int(out.shape[3])
    tile = [-(-height // tiles), -(-width // tiles)]
    scale, offset, size = [1, 1], [0, 0], list(tile)
    tensors = [None] * (last + 2)
    tensors[last + 1] = {"id": steps[-1].out, "scale": list(scale), "offset": list(offset), "size": list(size)}
    for step in reversed(steps):
        conv = step.conv
        for axis in (0, 1):
            s, k, d, p = (int(conv["strides"][axis]), int(conv["kernel"][axis]), int(conv["dilation"][axis]),
                          int(conv["padding"][axis]))
            scale[axis], offset[axis] = scale[axis] * s, offset[axis] * s - p
            size[axis] = (size[axis] - 1) * s + (k - 1) * d + 1
        src = [t for t in step.args if prog.tensor(t).kind != CONST][0]
        tensors[step.index] = {"id": src, "scale": list(scale), "offset": list(offset), "size": list(size)}
    for entry in tensors:
        shape = prog.tensor(entry["id"]).shape
        entry["channels"], entry["full"] = int(shape[1]), [int(shape[2]), int(shape[3])]
    extra = 0
    for step in steps:
        full = prog.tensor(step.out).shape
        tile_size = tensors[step.index + 1]["size"]
        pixels = tiles * tiles * tile_size[0] * tile_size[1]
        extra += int(step.macs) * pixels // (int(full[2]) * int(full[3])) - int(step.macs)
    return {"last": last, "tiles": [tiles, tiles], "tile": tile, "tensors": tensors, "extra_macs": int(extra),
            "kernels": {}, "pads": []}


def candidates(prog: Program) -> list:
    """Every patch description the planner weighs: stage ends 1 .. :func:`chain_end`, each
    with :data:`TILE_COUNTS` tiles per side (where the stage output has that many pixels)."""
    end = chain_end(prog)
    found = []
    for last in range(1, end + 1):
        shape = prog.tensor(prog.steps[last].out).shape
        for tiles in TILE_COUNTS:
            if tiles <= min(int(shape[2]), int(shape[3])):
                found.append(geometry(prog, last, tiles))
    return found


def view(prog: Program, patch: dict) -> Program:
    """The program as the patch schedule runs it, for the memory planner: the stage's
    intermediate tensors have tile shapes, the input tile and the output tile are tensors of their
    own (ids after the program's), and the stage output lives from step 0 on (tiles fill it).
    The stage's steps have no in-place kernel."""
    last = patch["last"]
    tensors = [dataclasses.replace(t) for t in prog.tensors]
    steps = [dataclasses.replace(s, args=list(s.args), arg_shapes=list(s.arg_shapes)) for s in prog.steps]
    entries = patch["tensors"]

    def tile(entry) -> tuple:
        return (1, entry["channels"], *entry["size"])

    first_in = len(tensors)
    tensors.append(dataclasses.replace(prog.tensor(entries[0]["id"]), id=first_in, name="patch_input_tile",
                                       shape=tile(entries[0]), kind=ACTIVATION, data=None))
    last_out = len(tensors)
    tensors.append(dataclasses.replace(prog.tensor(entries[-1]["id"]), id=last_out, name="patch_output_tile",
                                       shape=tile(entries[-1]), kind=ACTIVATION, data=None))
    for j in range(1, last + 1):
        tensors[entries[j]["id"]].shape = tile(entries[j])
    for step in steps[:last + 1]:
        step.inplace_kernel = ""
        position = step.args.index(entries[step.index]["id"])
        if step.index == 0:
            step.args[position] = first_in
        step.arg_shapes[position] = tile(entries[step.index])
    steps[last].out = last_out
    stage_out = entries[-1]["id"]
    if prog.tensor(stage_out).kind == ACTIVATION:
        steps[0].args.append(stage_out)  # written tile by tile from the first step on
        steps[0].arg_shapes.append(prog.tensor(stage_out).shape)
    return Program(tensors, steps, prog.input_id, prog.output_id, prog.quant, prog.kernels_c,
                   prog.signatures, prog.variants)


# ----------------------------------------------------------------------------------------------
# The tile kernels


def attach_kernels(prog: Program, onnx_path, patch: dict, *, pass_name: str = "plan-memory") -> None:
    """Generate the stage's tile kernels (TVM) from the QCDQ ONNX at ``onnx_path``: put their C into
    ``prog.variants``, their names into ``patch["kernels"]`` and every stage tensor's padding value
    (its zero point, as a byte) into ``patch["pads"]``."""
    import onnx

    from . import lower_int8
    from .codegen import _extract_function, build_program
    from .onnx_graph import index, zero_points
    from .onnx_import import import_onnx_model

    last = patch["last"]
    model = onnx.load(str(onnx_path))
    graph_index = index(model.graph)  # (producer, consumers)
    quantized = [_quantized_output(model, graph_index, prog.steps[i], pass_name) for i in range(last + 1)]
    # The graph goes on to the step after the stage, so that the stage's last kernel writes an
    # intermediate tensor (a model output is converted to int8) as on the whole map.
    beyond = last + 1 < len(prog.steps)
    end = _quantized_output(model, graph_index, prog.steps[last + 1], pass_name) if beyond else quantized[-1]
    stage_nodes = {step.node.rsplit(" (", 1)[0] for step in prog.steps[:last + 1]}
    sub = _stage_model(model, graph_index, patch, end, stage_nodes, pass_name, beyond)
    try:
        stage = build_program(lower_int8(import_onnx_model(sub, pass_name=pass_name), pass_name=pass_name),
                              pass_name=pass_name)
    except (RuntimeError, ValueError) as err:  # TVM's errors are RuntimeErrors
        raise PassError(pass_name, f"the patch stage (steps 0-{last}) does not lower on tiles of "
                                   f"{patch['tile'][0]}x{patch['tile'][1]} outputs: {str(err).splitlines()[0]}") from err
    if len(stage.steps) < last + 1 + beyond:
        raise PassError(pass_name, f"the patch stage (steps 0-{last}) lowered to {len(stage.steps)} kernels "
                                   f"on tiles, not {last + 1 + beyond}: it cannot run in patches")
    kernels = {}
    for step, tiled in zip(prog.steps[:last + 1], stage.steps):
        want = (1, patch["tensors"][step.index + 1]["channels"], *patch["tensors"][step.index + 1]["size"])
        consts = [t for t in step.args if prog.tensor(t).kind == CONST]
        tiled_consts = [t for t in tiled.args if stage.tensor(t).kind == CONST]
        same = tiled.op == step.op and tuple(stage.tensor(tiled.out).shape) == want and len(consts) == len(
            tiled_consts) and all(np.array_equal(prog.tensor(a).data, stage.tensor(b).data)
                                  and prog.tensor(a).dtype == stage.tensor(b).dtype
                                  for a, b in zip(consts, tiled_consts))
        if not same or stage.signatures[tiled.kernel] != prog.signatures[step.kernel]:
            raise PassError(pass_name, f"step {step.index} ({step.name}) lowers on tiles to another kernel "
                                       "interface or other constants than on its map: it cannot run in patches")
        kernels[str(step.index)] = _tile_name(tiled.kernel)
    source = stage.kernels_c
    for tiled in stage.steps:
        source = source.replace(f"void {tiled.kernel}(", f"void {_tile_name(tiled.kernel)}(")
    for name in sorted(set(kernels.values())):
        prog.variants[name] = _extract_function(source, name, pass_name)
    points = zero_points(model)
    pads = [int(prog.quant["input"]["zero_point"])] + [points[q] for q in quantized]
    patch["kernels"], patch["pads"] = kernels, [p & 0xFF for p in pads]


def _tile_name(kernel: str) -> str:
    """A tile kernel's C name from the sub-program's layer kernel name (``distillc_kNN_*``)."""
    return kernel.replace("distillc_k", KERNEL_PREFIX, 1)


def _quantized_output(model, graph_index, step, pass_name: str) -> str:
    """The quantized ONNX tensor a conv step writes: its node's output followed through
    element-wise ops to the first QuantizeLinear (and a narrow-range Clip after it);
    ``graph_index`` is ``onnx_graph.index(model.graph)``."""
    _, consumers = graph_index
    name = step.node.rsplit(" (", 1)[0]
    node = next((n for n in model.graph.node if n.name == name), None)
    if node is None:
        raise PassError(pass_name, f"step {step.index} ({step.name}) names ONNX node {name!r}, which the "
                                   "model lacks: it cannot run in patches")
    current = node.output[0]
    for _ in range(8):
        users = consumers.get(current, [])
        if len(users) != 1 or users[0].op_type not in ("Relu", "Clip", "QuantizeLinear", "Reshape", "Flatten"):
            break
        current = users[0].output[0]
        if users[0].op_type == "QuantizeLinear":
            after = consumers.get(current, [])
            if len(after) == 1 and after[0].op_type == "Clip":
                current = after[0].output[0]
            return current
    raise PassError(pass_name, f"step {step.index} ({step.name}): no quantized ONNX tensor follows node "
                               f"{name!r}: it cannot run in patches")


def _stage_model(model, graph_index, patch: dict, quantized: str, stage_nodes: set, pass_name: str, beyond: bool):
    """The QCDQ graph of the stage alone: the model input at its tile size, the stage's convs
    (``stage_nodes``) unpadded,
    ``quantized`` dequantized as the graph output (the stage's output at the output tile size, or
    with ``beyond`` the next layer's, whose shape the importer infers)."""
    import onnx
    from onnx import helper

    producer, consumers = graph_index
    dequantize = next((n for n in consumers.get(quantized, []) if n.op_type == "DequantizeLinear"), None)
    if dequantize is None:
        raise PassError(pass_name, f"the patch stage's output {quantized!r} is not dequantized in the ONNX graph")
    needed, todo = set(), [dequantize]
    while todo:
        node = todo.pop()
        if id(node) in needed:
            continue
        needed.add(id(node))
        todo += [producer[name] for name in node.input if name in producer]
    sub = copy.deepcopy(model)
    graph = sub.graph
    kept = [n for n, original in zip(graph.node, model.graph.node) if id(original) in needed]
    del graph.node[:]
    graph.node.extend(kept)
    for node in graph.node:
        if node.op_type == "Conv" and node.name in stage_nodes:
            for attr in node.attribute:
                if attr.name == "pads":
                    attr.ints[:] = [0] * len(attr.ints)
    del graph.value_info[:]
    (graph_input,) = [i for i in graph.input if i.name not in {init.name for init in graph.initializer}]
    dims = graph_input.type.tensor_type.shape.dim
    first = patch["tensors"][0]
    for dim, value in zip(dims, [1, first["channels"], *first["size"]]):
        dim.ClearField("dim_param")
        dim.dim_value = value
    last = patch["tensors"][-1]
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(dequantize.output[0], onnx.TensorProto.FLOAT,
                                                      None if beyond else [1, last["channels"], *last["size"]]))
    used = {name for node in graph.node for name in node.input}
    kept_init = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept_init)
    return sub


# ----------------------------------------------------------------------------------------------
# The executor's stage loop


#: C of the one helper the stage loop calls (put into distillc_model.c when a plan patches).
FRAME_C = r"""/* Patch schedule: the tile of a (channels, height, width) map whose element (0, 0) lies at
 * (y0, x0) of the map.  Elements outside the map get `pad` (the layer's zero point: its padding);
 * with `map` != NULL the elements inside are copied from the map (a tile cut out of it), else they
 * are left as they are (a tile a kernel just computed).  With `store` set it goes the other way:
 * the tile's elements inside the map are written into the map (a stage output tile). */
static void distillc_patch_frame(uint8_t *tile, int32_t channels, int32_t tile_h, int32_t tile_w,
                                 uint8_t *map, int32_t map_h, int32_t map_w, int32_t y0, int32_t x0,
                                 uint8_t pad, int store)
{
    const int32_t x_lo = x0 < 0 ? -x0 : 0;
    const int32_t x_hi = map_w - x0 < tile_w ? map_w - x0 : tile_w;
    int32_t c, y, x;

    for (c = 0; c < channels; ++c) {
        for (y = 0; y < tile_h; ++y) {
            uint8_t *row = tile + (c * tile_h + y) * tile_w;
            const int32_t map_y = y0 + y;
            if (map_y < 0 || map_y >= map_h || x_hi <= x_lo) {
                if (!store) {
                    for (x = 0; x < tile_w; ++x) {
                        row[x] = pad;
                    }
                }
                continue;
            }
            if (store) {
                uint8_t *dst = map + (c * map_h + map_y) * map_w + x0;
                for (x = x_lo; x < x_hi; ++x) {
                    dst[x] = row[x];
                }
                continue;
            }
            for (x = 0; x < x_lo; ++x) {
                row[x] = pad;
            }
            if (map != NULL) {
                const uint8_t *src = map + (c * map_h + map_y) * map_w + x0;
                for (x = x_lo; x < x_hi; ++x) {
                    row[x] = src[x];
                }
            }
            for (x = x_hi; x < tile_w; ++x) {
                row[x] = pad;
            }
        }
    }
}
"""


def stage_lines(prog: Program, planned: Program, patch: dict, signatures: dict, pointer) -> list:
    """The executor's C for the stage: the tile loop, then the stage's trace calls.

    ``planned`` is :func:`view` of ``prog``; ``pointer(tensor)`` gives a tensor's C expression.
    A trace build (``-DDISTILLC_TRACE``) also stores every intermediate tile into a full-size
    static map, so each stage step is traced with its whole output as under the layer schedule;
    a counting build (``DISTILLC_TRACE_STEPS``, verify.qemu's per-layer counts) stores nothing (its
    maps stay zero) and charges the whole stage to its first step.
    """
    last, entries = patch["last"], patch["tensors"]
    ny, nx = patch["tiles"]
    th, tw = patch["tile"]
    out_h, out_w = entries[-1]["full"]
    tiles = [planned.tensor(len(prog.tensors))] + [planned.tensor(entries[j]["id"]) for j in range(1, last + 1)] \
        + [planned.tensor(len(prog.tensors) + 1)]
    stage_out = prog.tensor(entries[-1]["id"])

    def origin(j: int, axis: int) -> str:
        scale, offset = entries[j]["scale"][axis], entries[j]["offset"][axis]
        var = ("oy", "ox")[axis]
        term = var if scale == 1 else f"{var} * {scale}"
        return term if offset == 0 else f"{term} - {-offset}" if offset < 0 else f"{term} + {offset}"

    def frame(j: int, source: str, store: int) -> str:
        e = entries[j]
        return (f"distillc_patch_frame((uint8_t *){pointer(tiles[j])}, {e['channels']}, {e['size'][0]}, "
                f"{e['size'][1]}, {source}, {e['full'][0]}, {e['full'][1]}, {origin(j, 0)}, {origin(j, 1)}, "
                f"{patch['pads'][j]}u, {store});")

    lines = [f"    /* steps 0-{last} in {ny} x {nx} patches of {th} x {tw} outputs (patch schedule: each tile's",
             f"     * input region cut out of the model input, halos recomputed, {patch['extra_macs']} MACs more) */",
             "#ifdef DISTILLC_TRACE"]
    for j in range(1, last + 1):
        e = entries[j]
        lines.append(f"    static uint8_t patch_trace{j}[{e['channels'] * e['full'][0] * e['full'][1]}];")
    lines += ["#endif", "    {", "        int32_t ty, tx;", "",
              f"        for (ty = 0; ty < {ny}; ++ty) {{",
              f"            const int32_t oy = ty * {th} < {out_h - th} ? ty * {th} : {out_h - th};",
              f"            for (tx = 0; tx < {nx}; ++tx) {{",
              f"                const int32_t ox = tx * {tw} < {out_w - tw} ? tx * {tw} : {out_w - tw};",
              f"                {frame(0, '(uint8_t *)input', 0)}"]
    for step in prog.steps[:last + 1]:
        name = patch["kernels"][str(step.index)]
        args = [tiles[step.index] if t == entries[step.index]["id"] else prog.tensor(t) for t in step.args]
        args.append(tiles[step.index + 1])
        call = ", ".join(f"({ctype.strip()}){pointer(t)}" for ctype, t in zip(signatures[name], args))
        lines.append(f"                {name}({call});  /* {step.index}: {step.op} {step.name} */")
        j = step.index + 1
        if j <= last:
            lines.append(f"                {frame(j, 'NULL', 0)}")
            lines += ["#if defined(DISTILLC_TRACE) && !defined(DISTILLC_TRACE_STEPS)",
                      f"                {frame(j, f'patch_trace{j}', 1)}", "#endif"]
    lines += [f"                {frame(last + 1, f'(uint8_t *){pointer(stage_out)}', 1)}",
              "            }", "        }", "    }", "#ifdef DISTILLC_TRACE"]
    for step in prog.steps[:last + 1]:
        j = step.index + 1
        if j <= last:
            size = entries[j]["channels"] * entries[j]["full"][0] * entries[j]["full"][1]
            lines.append(f"    distillc_trace({step.index}, patch_trace{j}, {size}UL);")
        else:
            lines.append(f"    distillc_trace({step.index}, {pointer(stage_out)}, {stage_out.nbytes}UL);")
    lines.append("#endif")
    return lines
