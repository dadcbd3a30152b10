"""Run a model piece by piece over the same batches, keeping the tensors that cross between pieces on disk.

Sequential reconstruction reads, pass after pass, tensors ever deeper in the model. Running the whole prefix
every pass costs about depth/2 forward passes in all; here each pass runs only the segment between what an
earlier pass left behind and what it needs now, so all the passes together cost about one forward pass, plus
writing and reading the crossing tensors. They go to a temporary folder, one file per tensor and batch (the
operating system keeps them in memory while it has room), so memory stays bounded by a batch.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import onnx
from onnx import helper

from pfp_onnx.model import infer_shapes, subgraph_inputs, without_initializers


def element_types(model: onnx.ModelProto) -> dict[str, int]:
    """Every value's ONNX element type, from shape inference (pruning never changes one)."""
    inferred = infer_shapes(model).graph
    return {info.name: info.type.tensor_type.elem_type
            for info in [*inferred.input, *inferred.value_info, *inferred.output]
            if info.type.HasField("tensor_type")}


def backward_closure(model: onnx.ModelProto, names: Iterable[str]) -> set[str]:
    """Every value the named ones are computed from, themselves included."""
    needed = set(names)
    for node in reversed(model.graph.node):
        if needed.intersection(node.output):
            needed.update(node.input)
            needed.update(subgraph_inputs(node))
    return needed


def segment(model: onnx.ModelProto, available: set[str], outputs: Iterable[str], keep: set[str],
            types: Mapping[str, int]) -> tuple[onnx.ModelProto | None, list[str], list[str]]:
    """The nodes that compute `outputs` from the `available` values and the model's inputs, as a model whose
    inputs are the available values it reads (plus the graph inputs it reads) and whose outputs are the
    wanted values not available yet and the values it computes that `keep` names and nodes outside it read.

    Returns the model (None when every output is available already), the available values it reads, and
    its output names in order. A wanted graph input is none of these: the caller has it in its feeds."""
    graph_inputs = {info.name for info in model.graph.input}
    wanted = [name for name in dict.fromkeys(outputs) if name not in available and name not in graph_inputs]
    if not wanted:
        return None, [], []
    needed, kept_nodes = set(wanted), []
    for node in reversed(model.graph.node):
        if needed.intersection(node.output):
            kept_nodes.append(node)
            needed.update(name for name in [*node.input, *subgraph_inputs(node)] if name and name not in available)
    kept_nodes.reverse()
    kept_ids = {id(node) for node in kept_nodes}
    produced = {name for node in kept_nodes for name in node.output}
    reads = {name for node in kept_nodes for name in [*node.input, *subgraph_inputs(node)]}
    read_available = sorted(reads & available - produced)
    outside = {name for node in model.graph.node if id(node) not in kept_ids
               for name in [*node.input, *subgraph_inputs(node)]}
    crossing = sorted((produced & keep & outside) - set(wanted))
    result = without_initializers(model)
    graph = result.graph
    del graph.node[:], graph.output[:], graph.input[:], graph.value_info[:]
    graph.node.extend(kept_nodes)
    graph.initializer.extend(init for init in model.graph.initializer if init.name in reads)
    graph.input.extend(info for info in model.graph.input if info.name in reads)
    graph.input.extend(helper.make_tensor_value_info(name, types[name], None) for name in read_available)
    everything = wanted + crossing
    graph.output.extend(helper.make_tensor_value_info(name, types[name], None) for name in everything)
    return result, read_available, everything


# Kept tensors stay in memory up to this many bytes per cache (pruned and original: two); the rest go to
# files. On the text-line classifier the files' writes and reads were 3.3 s of an 18.8 s refit.
MEMORY_BYTES = 256 * 2**20


class ActivationCache:
    """Tensors per batch index: in memory up to `memory_bytes`, beyond that in files of a temporary folder
    removed by close(). Memory stays bounded by the cap and a batch, whatever the number of points."""

    def __init__(self, memory_bytes: int = MEMORY_BYTES) -> None:
        self._folder = Path(tempfile.mkdtemp(prefix="pfp-onnx-segments-"))
        self._ids: dict[str, int] = {}
        self._next_id = 0  # never reused: a forgotten tensor's id must not name a later one's files
        self._held: dict[tuple[int, int], np.ndarray] = {}
        self._room = memory_bytes

    @property
    def names(self) -> set[str]:
        return set(self._ids)

    def write(self, batch: int, values: Mapping[str, np.ndarray]) -> None:
        for name, value in values.items():
            if name not in self._ids:
                self._ids[name], self._next_id = self._next_id, self._next_id + 1
            identifier = self._ids[name]
            value = np.asarray(value, order="C")
            if value.nbytes <= self._room:
                self._held[identifier, batch] = value.copy()  # the caller's array stays the caller's
                self._room -= value.nbytes
            else:
                np.save(self._folder / f"{identifier}-{batch}.npy", value)  # 0-d stays 0-d

    def read(self, batch: int, names: Iterable[str]) -> dict[str, np.ndarray]:
        found = {}
        for name in names:
            key = self._ids[name], batch
            found[name] = self._held[key] if key in self._held else np.load(self._folder / f"{key[0]}-{batch}.npy")
        return found

    def forget(self, names: Iterable[str]) -> None:
        """Drop tensors no later segment reads."""
        for name in list(names):
            identifier = self._ids.pop(name, None)
            if identifier is not None:
                for key in [key for key in self._held if key[0] == identifier]:
                    self._room += self._held.pop(key).nbytes
                for path in self._folder.glob(f"{identifier}-*.npy"):
                    path.unlink()

    def close(self) -> None:
        shutil.rmtree(self._folder, ignore_errors=True)
        self._ids.clear()
        self._held.clear()
