"""Loading, checking, shape inference and atomic saving of ONNX models.

Everything that touches model files lives here, so that the rest of the pipeline sees only in-memory
ModelProtos and graphsurgeon graphs.
"""

from __future__ import annotations

import gc
import os
import tempfile
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper

from pfp_onnx.errors import ModelError, OutputError

# protobuf refuses to serialise a single message above 2 GiB; larger models need external data.
PROTOBUF_LIMIT = 2**31 - 1
# Models above this size are checked through their skeleton (see skeleton()); shape inference always uses it.
SKELETON_MODEL_BYTES = 256 * 2**20
SKELETON_TENSOR_BYTES = 2**20
# Shape inference keeps only initializers up to this size (shape arithmetic reads a few integers; weights'
# values never change a shape).
INFERENCE_TENSOR_BYTES = 2**14
# Tensors above this go to the data file when a model is written with external data (onnx's threshold).
EXTERNAL_TENSOR_BYTES = 1024
# Offsets in data files written here are multiples of this (a page on every platform onnxruntime maps).
DATA_ALIGNMENT = 2**16
PRUNABLE_OPS = ("Conv", "Gemm", "MatMul")


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Read a model (external data included) and check it, turning every failure into a ModelError."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"Model file '{path}' does not exist or is not a file. Check the path.")
    try:
        model = onnx.load(str(path), load_external_data=True)
    except Exception as exc:  # protobuf raises several unrelated types for corrupt bytes
        raise ModelError(
            f"Could not read '{path}' as an ONNX model ({type(exc).__name__}: {first_line(exc)}). "
            "Make sure the file is a complete .onnx file (not truncated, not another format) and that "
            "any external-data files sit beside it."
        ) from None
    if not model.graph.node:
        raise ModelError(f"'{path}' holds no ONNX graph nodes; it is not a usable ONNX model.")
    if _has_invalid_text(model.graph):
        raise ModelError(f"'{path}' holds names that are not valid UTF-8 text, so it is damaged or not ONNX. "
                         "Re-export the model.")
    check_model(model, what=f"'{path}'")
    return model


def _has_invalid_text(graph: onnx.GraphProto) -> bool:
    """protobuf hands undecodable string fields back as bytes; such a model breaks later steps."""
    names = [graph.name]
    for infos in (graph.input, graph.output, graph.value_info, graph.initializer):
        names.extend(info.name for info in infos)
    for node in graph.node:
        names.extend([node.name, node.op_type, node.domain, *node.input, *node.output])
        if any(_has_invalid_text(attr.g) for attr in node.attribute if attr.HasField("g")):
            return True
        if any(_has_invalid_text(sub) for attr in node.attribute for sub in attr.graphs):
            return True
    return any(isinstance(name, bytes) for name in names)


def check_model(model: onnx.ModelProto, *, what: str = "the model", full: bool = False) -> None:
    """onnx.checker; a large model is checked as its skeleton (structure and shapes, not weight bytes)."""
    try:
        onnx.checker.check_model(skeleton(model), full_check=full)
    except UnicodeError:
        raise ModelError(f"{what} holds text that is not valid UTF-8, so it is damaged or not ONNX. "
                         "Re-export the model.") from None
    except onnx.checker.ValidationError as exc:
        raise ModelError(
            f"{what} fails the ONNX checker: {_message(exc)}. Fix or re-export the model "
            "(e.g. with a newer exporter) before pruning it."
        ) from None


def model_bytes(model: onnx.ModelProto) -> int:
    """The serialised size (an upper estimate), summed per node and initializer: protobuf cannot size a
    message above 2 GB."""
    graph = model.graph
    return (sum(tensor_bytes(init) for init in graph.initializer) + sum(node.ByteSize() for node in graph.node)
            + sum(info.ByteSize() for info in [*graph.input, *graph.output, *graph.value_info]))


def tensor_bytes(tensor: onnx.TensorProto) -> int:
    """A tensor's serialised size, or a little more. protobuf's ByteSize() walks raw bytes (~0.1 s per few
    hundred MB, asked often), so raw tensors are sized from their shape: at least one byte per element,
    which over-counts only the packed 4-bit types, plus a generous allowance for name, dims and tags."""
    if not tensor.HasField("raw_data"):
        return tensor.ByteSize()
    try:
        itemsize = max(1, helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize)
    except (KeyError, ValueError, TypeError):
        return tensor.ByteSize()
    elements = int(np.prod(tensor.dims, dtype=np.int64))
    return (elements * itemsize + 64 + 11 * len(tensor.dims) + len(tensor.name.encode())
            + len(tensor.doc_string.encode()))


def free_graph_weights(model: onnx.ModelProto) -> None:
    """Collect garbage now when `model` is large: graphsurgeon graphs are cyclic, so a dropped graph's
    weight arrays wait for the next full collection. For small models that wait costs nothing, while a
    collection costs ~0.1 s in a process with many objects."""
    if model_bytes(model) > SKELETON_MODEL_BYTES:
        gc.collect()


def skeleton(model: onnx.ModelProto, *, for_inference: bool = False) -> onnx.ModelProto:
    """The model itself when small; else a copy whose large initializers became graph inputs. For shape
    inference, whatever the model's size, every initializer above INFERENCE_TENSOR_BYTES becomes an input.

    Checking and shape inference need shapes, not weight bytes: the skeleton of a multi-GB model is a few
    kB, so no step ever copies or re-serialises the weights just to look at the graph.
    """
    limit = INFERENCE_TENSOR_BYTES if for_inference else SKELETON_TENSOR_BYTES
    large = [init for init in model.graph.initializer if tensor_bytes(init) > limit]
    if (model_bytes(model) <= SKELETON_MODEL_BYTES and not for_inference) or not large:
        return model
    large_names = {init.name for init in large}
    result = without_initializers(model)
    graph = result.graph
    graph.input.extend(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims))
                       for init in large if init.name not in {info.name for info in model.graph.input})
    graph.initializer.extend(init for init in model.graph.initializer if init.name not in large_names)
    return result


def externalized(model: onnx.ModelProto, data_path: str | os.PathLike, location: str, *,
                 threshold: int = EXTERNAL_TENSOR_BYTES) -> onnx.ModelProto:
    """A small copy of `model` whose raw tensors above `threshold` bytes are written to `data_path` one at a
    time and referenced as external data at `location` (relative to the model file).

    `model` is neither copied whole nor changed: onnx.save(save_as_external_data=True) would move the bytes
    out of the caller's proto, and a copy first would hold the weights twice. Offsets are aligned so that
    onnxruntime may map the weights rather than copy them.
    """
    shell = without_initializers(model)
    with open(data_path, "wb") as handle:
        for tensor in model.graph.initializer:
            if not tensor.HasField("raw_data") or tensor_bytes(tensor) <= threshold:
                shell.graph.initializer.append(tensor)
                continue
            offset = -(-handle.tell() // DATA_ALIGNMENT) * DATA_ALIGNMENT
            handle.seek(offset)
            data = tensor.raw_data
            handle.write(data)
            reference = shell.graph.initializer.add()
            _copy_fields(tensor, reference, skip={"raw_data", "data_location", "external_data"})
            reference.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", location), ("offset", str(offset)), ("length", str(len(data)))):
                entry = reference.external_data.add()
                entry.key, entry.value = key, value
            del data
    return shell


def with_outputs(model: onnx.ModelProto, tensor_names: Iterable[str]) -> onnx.ModelProto:
    """A copy of `model` that also outputs the named intermediate tensors (typed from shape inference)."""
    augmented = onnx.ModelProto()
    augmented.CopyFrom(model)
    known = {info.name: info for info in infer_shapes(model).graph.value_info}
    existing = {output.name for output in augmented.graph.output}
    for name in tensor_names:
        if name in existing:
            continue
        info = known.get(name) or helper.make_tensor_value_info(name, TensorProto.FLOAT, None)
        augmented.graph.output.append(info)
        existing.add(name)
    return augmented


def subgraph_inputs(node: onnx.NodeProto) -> set[str]:
    """Every name the node's subgraphs (If, Loop, Scan bodies) read, outer-scope values among them."""
    names: set[str] = set()
    for attribute in node.attribute:
        for graph in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
            for inner in graph.node:
                names.update(inner.input)
                names.update(subgraph_inputs(inner))
    return names


def without_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every field of the model except its graph's initializers (small whatever the weights)."""
    result = onnx.ModelProto()
    _copy_fields(model, result, skip={"graph"})
    _copy_fields(model.graph, result.graph, skip={"initializer"})
    return result


def _copy_fields(source, target, *, skip: set[str]) -> None:
    """Copy the set fields of one protobuf message into another of the same type, except `skip`."""
    for field, value in source.ListFields():
        if field.name in skip:
            continue
        if hasattr(value, "extend"):  # repeated
            getattr(target, field.name).extend(value)
        elif hasattr(value, "CopyFrom"):  # message
            getattr(target, field.name).CopyFrom(value)
        else:
            setattr(target, field.name, value)


def static_dims(tensor_type: onnx.TypeProto.Tensor) -> tuple[int | None, ...]:
    """A tensor type's dims, None where the size is open: a named dim, a missing one, or a non-positive
    value (Paddle writes a dynamic batch as dim_value -1; onnxruntime accepts any size there)."""
    return tuple(dim.dim_value if dim.HasField("dim_value") and dim.dim_value > 0 else None
                 for dim in tensor_type.shape.dim)


def with_input_shapes(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]]) -> onnx.ModelProto:
    """A copy of the model's graph (its skeleton) whose inputs have the given concrete shapes,
    with every intermediate shape inferred.

    Channel counts and spatial sizes (for Flatten blocks and FLOPs) need concrete numbers even when the
    model declares dynamic batch or spatial dimensions.
    """
    concrete = onnx.ModelProto()
    concrete.CopyFrom(skeleton(model, for_inference=True))
    for graph_input in concrete.graph.input:
        if graph_input.name not in input_shapes:
            continue
        dims = graph_input.type.tensor_type.shape.dim
        for dim, size in zip(dims, input_shapes[graph_input.name]):
            dim.Clear()
            dim.dim_value = int(size)
    del concrete.graph.value_info[:]
    return infer_shapes(concrete)


def infer_shapes(model: onnx.ModelProto, *, strict: bool = False) -> onnx.ModelProto:
    """The model's graph with inferred value_info (its skeleton: without its large weights); `strict`
    also fails on inconsistent shapes (how a rewrite proves itself)."""
    try:
        # Inference needs no weight bytes, whatever the model's size (an 87 MB capture model: 0.35 → 0.01 s).
        return onnx.shape_inference.infer_shapes(skeleton(model, for_inference=True), strict_mode=strict,
                                                 data_prop=True)
    except Exception as exc:
        if strict:
            raise
        raise ModelError(
            f"ONNX shape inference failed on the model ({first_line(exc)}); pfp-onnx needs it to know "
            "channel counts. Check the model with onnx.checker and re-export it."
        ) from None


def to_graph(model: onnx.ModelProto) -> gs.Graph:
    """Import into graphsurgeon with every node named and every Constant node turned into a constant.

    Exporters (PaddlePaddle, some PyTorch paths) store weights as Constant nodes; treating them as
    constants lets one set of rules handle both. Node names are made unique and deterministic so that a
    second import of the same model (as the rewrite step does) names everything identically.
    """
    graph = gs.import_onnx(model)
    for node, name in zip(graph.nodes, node_names(model)):
        node.name = name
    for node in list(graph.nodes):
        if node.op == "Constant" and len(node.outputs) == 1:
            values = _constant_node_values(node)
            if values is not None and not any(out.name == node.outputs[0].name for out in graph.outputs):
                output = node.outputs[0]
                node.outputs.clear()
                output.to_constant(values)
    graph.cleanup(remove_unused_graph_inputs=False)
    return graph


def with_unique_node_names(model: onnx.ModelProto, *, in_place: bool) -> onnx.ModelProto:
    """The model with every node named as node_names() names it, when two nodes share a name (onnxruntime
    refuses such a model; the pruned model gets these names anyway). Unchanged (the same object) otherwise;
    a copy unless in_place."""
    names = [node.name for node in model.graph.node if node.name]
    if len(names) == len(set(names)):
        return model
    if not in_place:
        copied = onnx.ModelProto()
        copied.CopyFrom(model)
        model = copied
    for node, name in zip(model.graph.node, node_names(model)):
        node.name = name
    return model


def node_names(model: onnx.ModelProto) -> list[str]:
    """Unique, deterministic names for the model's nodes (unnamed or duplicate ones get op_index)."""
    counts = Counter(node.name for node in model.graph.node)
    used = set(counts)
    names = []
    for index, node in enumerate(model.graph.node):
        name = node.name
        if not name or counts[name] > 1:
            name = f"{node.op_type}_{index}"
            while name in used:
                name += "_"
            used.add(name)
        names.append(name)
    return names


def _constant_node_values(node: gs.Node) -> np.ndarray | None:
    attrs = node.attrs
    if "value" in attrs:
        value = attrs["value"]
        return np.asarray(value.values if isinstance(value, gs.Constant) else value)
    scalar_kinds = {"value_float": np.float32, "value_int": np.int64}
    for key, dtype in scalar_kinds.items():
        if key in attrs:
            return np.array(attrs[key], dtype=dtype)
    list_kinds = {"value_floats": np.float32, "value_ints": np.int64}
    for key, dtype in list_kinds.items():
        if key in attrs:
            return np.array(attrs[key], dtype=dtype)
    return None


def from_graph(graph: gs.Graph, original: onnx.ModelProto) -> onnx.ModelProto:
    """Export a rewritten graph, keeping the original's signature, opset, IR version and metadata."""
    model = gs.export_onnx(graph, do_type_check=True)
    model.ir_version = original.ir_version
    del model.opset_import[:]
    model.opset_import.extend(original.opset_import)
    model.producer_name = original.producer_name
    model.producer_version = original.producer_version
    model.domain = original.domain
    model.model_version = original.model_version
    model.doc_string = original.doc_string
    del model.metadata_props[:]
    model.metadata_props.extend(original.metadata_props)
    model.graph.name = original.graph.name
    model.graph.doc_string = original.graph.doc_string
    # Old exporters also list initializers as graph inputs; those entries must follow the new shapes.
    initializers = {init.name for init in model.graph.initializer}
    exported_inputs = {info.name: info for info in model.graph.input}
    inputs = [exported_inputs.get(info.name, info) if info.name in initializers else info
              for info in original.graph.input]
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    del model.graph.output[:]
    model.graph.output.extend(original.graph.output)
    del model.graph.value_info[:]
    doc_strings = {name: node.doc_string for name, node in zip(node_names(original), original.graph.node)
                   if node.doc_string}
    for node in model.graph.node:
        if node.name in doc_strings:
            node.doc_string = doc_strings[node.name]
    return model


def with_metadata(model: onnx.ModelProto, entries: dict[str, str]) -> onnx.ModelProto:
    """Record what pfp-onnx did in the model's metadata (existing entries of other keys are kept)."""
    kept = [prop for prop in model.metadata_props if prop.key not in entries]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in entries.items():
        model.metadata_props.add(key=key, value=value)
    return model


def parameter_count(model: onnx.ModelProto) -> int:
    """Every stored number: initializers plus tensors held by Constant nodes."""
    count = sum(int(np.prod(init.dims)) for init in model.graph.initializer)
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    count += int(np.prod(attr.t.dims))
    return count


def check_output_path(output: str | os.PathLike, model_path: str | os.PathLike | None,
                      *others: str | os.PathLike | None, option: str = "-o") -> Path:
    """Refuse outputs that would overwrite the input model, another input or output of the command
    (`others`: calibration data, the other output), or land in a missing or read-only folder."""
    output = Path(output)
    if model_path is not None and output.resolve() == Path(model_path).resolve():
        raise OutputError(
            f"The {option} path '{output}' is the input model itself; pfp-onnx never modifies its input. "
            f"Choose another file name for {option}."
        )
    for other in others:
        if other is not None and output.resolve() == Path(other).resolve():
            raise OutputError(f"The {option} path '{output}' is also '{other}', which this command reads or "
                              f"writes; choose another file name for {option}.")
    folder = output.resolve().parent
    if not folder.is_dir():
        raise OutputError(f"The output folder '{folder}' does not exist. Create it or choose another -o path.")
    if not os.access(folder, os.W_OK):
        raise OutputError(f"The output folder '{folder}' is not writable. Choose another -o path.")
    if output.is_dir():
        raise OutputError(f"The output path '{output}' is a folder; give a file name such as model.pruned.onnx.")
    return output


def default_output_path(model_path: str | os.PathLike) -> Path:
    """Where compress writes without -o: beside the input, its name with .pruned.onnx (model.onnx →
    model.pruned.onnx), so the input is never overwritten and a re-run replaces its own output."""
    model_path = Path(model_path)
    stem = model_path.stem if model_path.suffix.lower() == ".onnx" else model_path.name
    return model_path.with_name(f"{stem}.pruned.onnx")


def remove_model(output: str | os.PathLike) -> None:
    """Remove a model save_model wrote, with its external data file if it has one."""
    output = Path(output)
    for path in (output, output.with_name(f"{output.name}.data")):
        path.unlink(missing_ok=True)


def save_model(model: onnx.ModelProto, output: str | os.PathLike, *, external_data: bool = False) -> None:
    """Write atomically: to a temporary file in the target folder, then rename over the target.

    A crash or error mid-write therefore never leaves a partial model behind.
    """
    output = Path(output)
    external_data = external_data or model_bytes(model) > PROTOBUF_LIMIT
    handle, tmp_name = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.resolve().parent)
    os.close(handle)
    data_name = f"{output.name}.data"
    tmp_data = output.resolve().parent / f"{Path(tmp_name).name}.data"
    try:
        if external_data:  # the model refers to the final data file name from the start
            onnx.save(externalized(model, tmp_data, data_name), tmp_name)
            os.replace(tmp_data, output.resolve().parent / data_name)
        else:
            onnx.save(model, tmp_name)
        umask = os.umask(0)
        os.umask(umask)
        for written in (Path(tmp_name), output.resolve().parent / data_name if external_data else None):
            if written is not None:
                os.chmod(written, 0o666 & ~umask)  # mkstemp makes 0600 files; outputs are ordinary files
        os.replace(tmp_name, output)
    except OSError as exc:
        raise OutputError(f"Could not write '{output}': {exc.strerror or exc}. Check the disk and permissions.") from None
    finally:
        for leftover in (Path(tmp_name), tmp_data):
            if leftover.exists():
                leftover.unlink()


def first_line(exc: BaseException) -> str:
    """An exception's first line: enough for a one-paragraph message."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _message(exc: BaseException, limit: int = 400) -> str:
    """An exception's whole message on one line, capped: onnx spreads its checker errors over lines."""
    text = " ".join(str(exc).split()).rstrip(". ")
    return (text[:limit] + "…") if len(text) > limit else (text or type(exc).__name__)
