"""ONNX -> Relax import (the ``tvm.import`` stage).

TVM's ONNX frontend does the work.  Two small additions make its output easier to lower and
to explain when lowering fails:

* every ONNX node's result becomes a Relax variable named after the node, and the module
  attribute ``distillc.onnx_nodes`` maps that variable name to ``"<node name> (<op type>)"``,
  so an error in a later stage can name the ONNX node it came from;
* ``Clip`` with constant bounds becomes ``R.clip`` instead of two anonymous TIR calls
  (``maximum``/``minimum``), so the int8 rewrite can read the bounds.
"""

from __future__ import annotations

import re
from pathlib import Path

from distillc.errors import PassError

NODE_MAP_ATTR = "distillc.onnx_nodes"


def import_onnx(onnx_path: str | Path, *, pass_name: str = "tvm.import"):
    """Import an ONNX file (QCDQ or float) into a Relax IRModule with one ``main`` function.

    The input shape is taken from the model (dynamic dimensions are an error: a bundle has
    static shapes).  Raises ``PassError`` naming the node when the frontend cannot convert it.
    """
    import onnx

    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise PassError(pass_name, f"ONNX file not found: {onnx_path}")
    try:
        model = onnx.load(str(onnx_path))
    except Exception as err:  # onnx raises DecodeError and friends
        raise PassError(pass_name, f"cannot read ONNX file {onnx_path}: {err}") from err
    return import_onnx_model(model, pass_name=pass_name)


def import_onnx_model(model, *, pass_name: str = "tvm.import"):
    """Import an in-memory ``onnx.ModelProto``; see :func:`import_onnx`."""
    from tvm import relax  # noqa: F401  (registers the relax ops used by the frontend)
    from tvm.relax.frontend.onnx import onnx_frontend

    graph = model.graph
    initializer_names = {init.name for init in graph.initializer}
    shape_dict = {}
    for value in graph.input:
        if value.name in initializer_names:
            continue
        dims = []
        for dim in value.type.tensor_type.shape.dim:
            if not dim.HasField("dim_value"):
                raise PassError(
                    pass_name,
                    f"input {value.name!r} has a dynamic dimension "
                    f"({dim.dim_param or '?'}); export the model with a fixed input shape",
                )
            dims.append(int(dim.dim_value))
        shape_dict[value.name] = dims

    opset = 1
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            opset = entry.version
    importer_cls = _naming_importer_class(onnx_frontend)
    importer = importer_cls(shape_dict, "float32")
    try:
        mod = importer.from_onnx(graph, opset)
    except _NodeImportError as err:
        raise PassError(pass_name, str(err)) from err.__cause__
    except Exception as err:  # the frontend raises bare ValueError/NotImplementedError/TVMError
        raise PassError(pass_name, f"TVM's ONNX frontend failed: {_first_line(err)}") from err
    return mod.with_attr(NODE_MAP_ATTR, dict(importer.distillc_node_map))


class _NodeImportError(Exception):
    """Internal: carries the failing node's name and op type out of the frontend."""


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def sanitize_name(name: str) -> str:
    """ONNX node names (``/c1/Conv``) as C/Relax identifiers (``c1_Conv``)."""
    clean = re.sub(r"[^0-9A-Za-z_]+", "_", name).strip("_")
    if not clean:
        clean = "node"
    if clean[0].isdigit():
        clean = "n" + clean
    return clean


_IMPORTER_CLASS = None


def _naming_importer_class(onnx_frontend):
    """Build (once) a subclass of TVM's ONNX importer that names each node's Relax result."""
    global _IMPORTER_CLASS
    if _IMPORTER_CLASS is not None:
        return _IMPORTER_CLASS

    from tvm import relax

    base = onnx_frontend.ONNXGraphImporter

    class NamingImporter(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.distillc_node_map: dict[str, str] = {}
            self._distillc_used: set[str] = set()

        def _unique(self, node_name: str) -> str:
            base_name = sanitize_name(node_name)
            name, i = base_name, 1
            while name in self._distillc_used:
                i += 1
                name = f"{base_name}_{i}"
            self._distillc_used.add(name)
            return name

        def _convert_operator(self, op_name, inputs, attrs, opset):
            node_name = attrs.get("tvm_custom", {}).get("name") or op_name
            try:
                if op_name == "Clip":
                    result = self._distillc_clip(inputs, attrs)
                    if result is None:
                        result = super()._convert_operator(op_name, inputs, attrs, opset)
                else:
                    result = super()._convert_operator(op_name, inputs, attrs, opset)
            except Exception as err:
                raise _NodeImportError(
                    f"cannot import ONNX node {node_name!r} ({op_name}): {_first_line(err)}"
                ) from err
            label = f"{node_name} ({op_name})"
            if isinstance(result, relax.Call) and not isinstance(result.ty, relax.TupleType):
                name = self._unique(node_name)
                result = self.bb.emit(result, name_hint=name)
                self.distillc_node_map[name] = label
            elif isinstance(result, relax.Var):
                self.distillc_node_map.setdefault(result.name, label)
            return result

        def _distillc_clip(self, inputs, attrs):
            """Clip with constant scalar bounds as one ``R.clip`` (None: let TVM convert it)."""
            data = inputs[0]
            if "min" in attrs or "max" in attrs:  # opset < 11: bounds are attributes
                lo, hi = attrs.get("min"), attrs.get("max")
            else:
                lo = _scalar_constant(inputs[1] if len(inputs) > 1 else None)
                hi = _scalar_constant(inputs[2] if len(inputs) > 2 else None)
                if (len(inputs) > 1 and inputs[1] is not None and lo is None) or (
                    len(inputs) > 2 and inputs[2] is not None and hi is None
                ):
                    return None
            dtype = str(data.ty.dtype)
            lo = _dtype_min(dtype) if lo is None else lo
            hi = _dtype_max(dtype) if hi is None else hi
            if dtype.startswith("int") or dtype.startswith("uint"):
                lo, hi = int(lo), int(hi)
            else:
                lo, hi = float(lo), float(hi)
            return relax.op.clip(data, relax.prim_value(_prim(lo, dtype)), relax.prim_value(_prim(hi, dtype)))

    _IMPORTER_CLASS = NamingImporter
    return NamingImporter


def _prim(value, dtype: str):
    import tvm

    if dtype.startswith("float"):
        return tvm.tirx.FloatImm(dtype, float(value))
    return tvm.tirx.IntImm(dtype, int(value))


def _scalar_constant(expr):
    import tvm

    if expr is None or not isinstance(expr, tvm.ir.Constant):
        return None
    arr = expr.value.numpy()
    if arr.size != 1:
        return None
    return arr.reshape(()).item()


def _dtype_min(dtype: str):
    import numpy as np

    if dtype.startswith("float"):
        return float(np.finfo(dtype).min)
    return int(np.iinfo(dtype).min)


def _dtype_max(dtype: str):
    import numpy as np

    if dtype.startswith("float"):
        return float(np.finfo(dtype).max)
    return int(np.iinfo(dtype).max)
