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
from onnx.reference import ReferenceEvaluator

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
LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")  # every weighted layer: timed, and ends an output's reach
# ops that move a tensor's elements without changing them: an elementwise op seen through them acts on every one
LAYOUT_OPS = frozenset({"Reshape", "Flatten", "Identity", "Squeeze", "Unsqueeze", "Transpose", "Concat"})


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


def for_analysis(model: onnx.ModelProto, *, in_place: bool) -> onnx.ModelProto:
    """The model as the analysis, capture and rewrite read it: every node uniquely named
    (with_unique_node_names) and every layer weight the graph computes from constants folded
    (with_layer_weights_folded). Unchanged (the same object) when neither applies; a copy unless in_place."""
    named = with_unique_node_names(model, in_place=in_place)
    return with_layer_weights_folded(named, in_place=in_place or named is not model)


# Operators that only pick, reorder or retype the entries of constants: a layer weight that a chain of these
# computes from initializers and Constant nodes is a constant, written out by the graph.
WEIGHT_CHAIN_OPS = frozenset({"Cast", "Constant", "Gather", "Identity", "Reshape", "Slice", "Split", "Squeeze",
                              "Transpose", "Unsqueeze"})
# (weight, bias) input indices of the layers the analysis prunes; a MatMul's bias is the Add after it
LAYER_WEIGHT_INPUTS = {"Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (1, 2), "MatMul": (1,)}


def with_layer_weights_folded(model: onnx.ModelProto, *, in_place: bool) -> onnx.ModelProto:
    """The model with every layer weight that the graph computes from constants alone made an initializer.

    PyTorch's dynamo exporter writes nn.MultiheadAttention's separate q, k and v projections (DETR's) as
    Split + Transpose of the one in-projection constant [3E, E], and their biases as a Split of [3E]: to
    the analysis, MatMuls of two activations. The weight of a Conv, ConvTranspose, Gemm or MatMul computed
    by WEIGHT_CHAIN_OPS from constants becomes an initializer of the same name, and so does its bias (a
    Conv's or Gemm's third input, the Add right after a MatMul) where that is computed too. Nothing else is
    folded: Paddle's Reshape(bias [C], [1, C, 1, 1]) after a Conv with a stored weight stays, for the
    analysis cuts that bias before the Reshape and rewrites the Reshape's target. A fold must free the
    constant it starts from and store no more numbers than it held (a tied embedding, read by a Gather and,
    transposed, by the output MatMul, is not copied); the nodes and initializers that only the folded
    weights read go. Unchanged (the same object) when nothing is folded; a copy unless in_place.
    """
    graph = model.graph
    producer_index = {name: index for index, node in enumerate(graph.node) for name in node.output if name}
    layers = _layers_freeing_their_sources(graph, producer_index, _computed_layer_weights(graph))
    if not layers:
        return model
    sources = {name: _data_path(graph, producer_index, name)[-1] for layer in layers for name in layer}
    values = _evaluated(model, set(sources) | set(sources.values()))
    stored_before = {init.name: int(np.prod(init.dims, dtype=np.int64)) for init in graph.initializer}
    stored_before.update((source, values[source].size) for source in sources.values() if source in values)
    while True:  # a source whose folds hold more numbers than it did (a Gather repeating rows) stays
        stored: dict[str, int] = {}
        for name in {name for layer in layers for name in layer}:
            stored[sources[name]] = stored.get(sources[name], 0) + values[name].size
        grown = {source for source, size in stored.items() if size > stored_before[source]}
        if not grown:
            break
        layers = _layers_freeing_their_sources(
            graph, producer_index, [layer for layer in layers if not any(sources[name] in grown for name in layer)])
    if not layers:
        return model
    folded = {name: nodes for layer in layers for name, nodes in layer.items()}

    if not in_place:
        copied = onnx.ModelProto()
        copied.CopyFrom(model)
        model = copied
    graph = model.graph
    taken = {name for node in graph.node for name in list(node.input) + list(node.output)}
    taken |= {init.name for init in graph.initializer} | {info.name for info in graph.input}
    for name in folded:  # the initializer takes the name; its producer's output is renamed out of the way
        producer = graph.node[producer_index[name]]
        replacement = name + "__folded"
        while replacement in taken:
            replacement += "_"
        taken.add(replacement)
        producer.output[list(producer.output).index(name)] = replacement
        graph.initializer.append(onnx.numpy_helper.from_array(values[name], name))
    chain = set().union(*folded.values())
    read = {output.name for output in graph.output}
    for index, node in enumerate(graph.node):
        if index not in chain:
            read.update(node.input)
            read.update(subgraph_inputs(node))
    dropped = set()
    for index in sorted(chain, reverse=True):  # a node stays while something still reads what it computes
        node = graph.node[index]
        if any(name in read for name in node.output if name):
            read.update(node.input)
        else:
            dropped.add(index)
    freed = {name for index in dropped for name in graph.node[index].input} - read
    gone = {name for index in dropped for name in graph.node[index].output} | set(folded)
    kept_nodes = [node for index, node in enumerate(graph.node) if index not in dropped]
    del graph.node[:]
    graph.node.extend(kept_nodes)
    freed -= {info.name for info in graph.input}  # one listed as an input stays (IR < 4)
    kept_initializers = [init for init in graph.initializer if init.name not in freed]
    del graph.initializer[:]
    graph.initializer.extend(kept_initializers)
    kept_infos = [info for info in graph.value_info if info.name not in gone]
    del graph.value_info[:]
    graph.value_info.extend(kept_infos)
    return model


def _computed_layer_weights(graph: onnx.GraphProto) -> list[dict[str, frozenset[int]]]:
    """Per layer whose weight the graph computes from constants, that weight and its bias if computed too,
    each with the indices of the nodes computing it. A weight that is an initializer or a Constant node's
    output is no computed one (to_graph reads those as they are)."""
    initializers = {init.name for init in graph.initializer}
    producer_index = {name: index for index, node in enumerate(graph.node) for name in node.output if name}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in set(node.input):
            readers.setdefault(name, []).append(node)
    graph_outputs = {output.name for output in graph.output}
    cones: dict[str, frozenset[int] | None] = {}

    def cone(name: str) -> frozenset[int] | None:
        """The nodes computing `name` from constants alone; None when it reads anything else."""
        if name not in cones:
            cones[name] = None  # a cycle (no valid graph has one) reads as not constant
            index = producer_index.get(name)
            if name in initializers:
                cones[name] = frozenset()
            elif index is not None and graph.node[index].op_type in WEIGHT_CHAIN_OPS \
                    and graph.node[index].domain in ("", "ai.onnx"):
                parts = [cone(source) for source in graph.node[index].input if source]
                if all(part is not None for part in parts):
                    cones[name] = frozenset({index}).union(*parts)
        return cones[name]

    def computed(name: str) -> frozenset[int] | None:
        nodes = cone(name) if name and name not in graph_outputs else None
        return nodes if nodes and any(graph.node[index].op_type != "Constant" for index in nodes) else None

    layers = []
    for node in graph.node:
        if node.domain not in ("", "ai.onnx") or node.op_type not in LAYER_WEIGHT_INPUTS:
            continue
        weight_index, *bias_index = LAYER_WEIGHT_INPUTS[node.op_type]
        weight = node.input[weight_index] if weight_index < len(node.input) else ""
        if computed(weight) is None:
            continue
        biases = [node.input[index] for index in bias_index if index < len(node.input)]
        after = readers.get(node.output[0], [])
        if node.op_type == "MatMul" and len(after) == 1 and after[0].op_type == "Add":
            biases = [name for name in after[0].input if name != node.output[0]]
        layers.append({name: computed(name) for name in [weight, *biases] if computed(name) is not None})
    return layers


def _data_path(graph: onnx.GraphProto, producer_index: dict[str, int], name: str) -> list[str]:
    """`name`, the tensor it is computed from (every WEIGHT_CHAIN_OPS operator's first input is its data;
    the others are shapes, axes, indices, split sizes), and so on back to an initializer or a Constant
    node's output."""
    path = [name]
    while path[-1] in producer_index and graph.node[producer_index[path[-1]]].op_type != "Constant":
        path.append(graph.node[producer_index[path[-1]]].input[0])
    return path


def _evaluated(model: onnx.ModelProto, names: set[str]) -> dict[str, np.ndarray]:
    """The values of the named tensors that nodes compute from constants (initializers among `names` are
    left out), by onnx's reference evaluator on the nodes that compute them alone."""
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    producer_index = {name: index for index, node in enumerate(graph.node) for name in node.output if name}
    outputs = sorted(name for name in names if name in producer_index)
    wanted, needed = set(outputs), set()
    while wanted:
        name = wanted.pop()
        if name in producer_index and producer_index[name] not in needed:
            needed.add(producer_index[name])
            wanted.update(source for source in graph.node[producer_index[name]].input if source)
    nodes = [graph.node[index] for index in sorted(needed)]
    leaves = {name for node in nodes for name in node.input if name in initializers}
    evaluated = helper.make_model(
        helper.make_graph(nodes, "layer_weights", [], [helper.make_empty_tensor_value_info(n) for n in outputs],
                          [initializers[name] for name in sorted(leaves)]),
        ir_version=model.ir_version, opset_imports=model.opset_import)
    return dict(zip(outputs, (np.asarray(value) for value in ReferenceEvaluator(evaluated).run(None, {}))))


def _layers_freeing_their_sources(graph: onnx.GraphProto, producer_index: dict[str, int],
                                  layers: list[dict[str, frozenset[int]]]) -> list[dict[str, frozenset[int]]]:
    """The layers whose fold frees what their weights are computed from: along each weight's data path,
    nothing but the folded computation reads the constant it starts from or any step after it, and the
    steps' other outputs (a Split's other parts) are folded too or read by the folded computation alone.
    The small inputs beside the data (shapes, axes, indices) may stay read elsewhere."""
    readers: dict[str, set[int]] = {}
    for index, node in enumerate(graph.node):
        for name in set(node.input) | subgraph_inputs(node):
            readers.setdefault(name, set()).add(index)
    pinned = {info.name for info in graph.output} | {info.name for info in graph.input}
    while True:
        folded = {name for layer in layers for name in layer}
        chain = set().union(*(nodes for layer in layers for nodes in layer.values()))

        def read_elsewhere(name: str) -> bool:
            return name in pinned or not readers.get(name, set()) <= chain

        def frees(name: str) -> bool:
            path = _data_path(graph, producer_index, name)
            steps = [graph.node[producer_index[step]] for step in path if step in producer_index]
            return (not any(read_elsewhere(step) for step in path[1:])
                    and not any(output and output not in path and output not in folded and read_elsewhere(output)
                                for node in steps for output in node.output))

        freeing = [layer for layer in layers if all(frees(name) for name in layer)]
        if len(freeing) == len(layers):
            return layers
        layers = freeing


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
