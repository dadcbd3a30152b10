"""Calibration data: read an .npz, validate it against the model's inputs, split it, batch it.

All validation happens before any expensive work, so a mismatch costs the user seconds, not minutes.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

import numpy as np
import onnx
from onnx import helper

from pfp_onnx.errors import DataError
from pfp_onnx.model import static_dims
from pfp_onnx.npz import LoadWhole, NpzArray

LABELS = "labels"


class DataNote(UserWarning):
    """Something pfp-onnx assumed about the calibration data that the user should know, though it is not an
    error (an array taken for an input of another name); the command line prints it as a note."""


@dataclass(frozen=True)
class InputSpec:
    """One graph input: name, numpy dtype, and dims (None where dynamic)."""

    name: str
    dtype: np.dtype
    dims: tuple[int | None, ...]


class CalibrationData:
    """Calibration points held in memory: arrays keyed by input name (points on axis 0) and optional labels.
    A part of a split keeps the whole arrays and the indices of its points, gathered batch by batch, so
    splitting copies nothing."""

    def __init__(self, inputs: Mapping[str, np.ndarray], labels: np.ndarray | None,
                 rows: np.ndarray | None = None) -> None:
        self._arrays, self._labels, self._rows = dict(inputs), labels, rows

    @property
    def count(self) -> int:
        return len(self._rows) if self._rows is not None else len(next(iter(self._arrays.values())))

    @property
    def inputs(self) -> dict[str, np.ndarray]:
        """This data's points per input (gathered into new arrays for a part of a split)."""
        return {name: self._pick(array, slice(None)) for name, array in self._arrays.items()}

    @property
    def labels(self) -> np.ndarray | None:
        return None if self._labels is None else self._pick(self._labels, slice(None))

    def subset(self, indices: np.ndarray) -> CalibrationData:
        """The points at `indices` (of this data's points), without copying them."""
        return CalibrationData(self._arrays, self._labels, indices if self._rows is None else self._rows[indices])

    def batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        """Model feeds of `batch_size` points, with their `labels` when the data has them."""
        for start in range(0, self.count, batch_size):
            points = slice(start, start + batch_size)
            batch = {name: self._pick(array, points) for name, array in self._arrays.items()}
            if self._labels is not None:
                batch[LABELS] = self._pick(self._labels, points)
            yield batch

    def _pick(self, array: np.ndarray, points: slice) -> np.ndarray:
        return array[points] if self._rows is None else array[self._rows[points]]

    def point_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes of a single point (batch 1): makes dynamic dims concrete for shape inference."""
        return {name: (1,) + array.shape[1:] for name, array in self._arrays.items()}


class StreamedData:
    """Calibration data too large for memory: `source()` returns a fresh iterable of batches (dicts keyed
    by input name, optional `labels`) and is called once per pass over the data.

    Each batch is validated as it arrives. The held-out split is drawn point by point from a generator
    re-seeded at the start of every pass, so every pass sees the same split without storing it; `count`
    is known after the first full pass.
    """

    def __init__(self, source: Callable[[], Iterable[Mapping[str, np.ndarray]]], model: onnx.ModelProto,
                 part: str = "all", holdout: float = 0.0, seed: int = 0):
        self.source, self.model = source, model
        self.part, self.holdout, self.seed = part, holdout, seed
        self.count: int | None = None
        self.labels = None  # labels travel inside the batches
        self.exact: int | None = None  # set by whole_batches(): re-batch to exactly this many points
        first = next(iter(self._validated()), None)
        if first is None:
            raise DataError("The calibration batch source yielded no points; it must yield at least one batch.")
        self._first = first

    def point_shapes(self) -> dict[str, tuple[int, ...]]:
        return self._first.point_shapes()

    def split(self, holdout: float, seed: int) -> tuple[StreamedData, StreamedData | None]:
        if not 0 <= holdout < 1:
            raise DataError(f"--holdout must be in [0, 1); got {holdout}.")
        parts = [StreamedData(self.source, self.model, "sensitivity", holdout, seed)]
        parts.append(StreamedData(self.source, self.model, "holdout", holdout, seed) if holdout > 0 else None)
        return parts[0], parts[1]

    def batches(self, batch_size: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """The source's batches (their own size; `batch_size` is ignored), filtered to this part; with
        `exact`, re-cut into batches of exactly that size, the last points that do not fill one dropped."""
        rng = np.random.default_rng(self.seed)
        seen = 0
        pending: list[dict[str, np.ndarray]] = []
        for data in self._validated():
            if self.part == "all":
                chosen = np.arange(data.count)
            else:
                held = rng.random(data.count) < self.holdout
                chosen = np.flatnonzero(held if self.part == "holdout" else ~held)
            if not len(chosen):
                continue
            part = next(data.subset(chosen).batches(len(chosen)))
            if self.exact is None:
                seen += len(chosen)
                yield part
                continue
            pending.append(part)
            while sum(points_in(batch) for batch in pending) >= self.exact:
                joined = {name: np.concatenate([batch[name] for batch in pending]) for name in pending[0]}
                pending = [{name: values[self.exact:] for name, values in joined.items()}]
                seen += self.exact
                yield {name: values[:self.exact] for name, values in joined.items()}
        self.count = seen

    def _validated(self) -> Iterator[CalibrationData]:
        for batch in self.source():
            yield validate(batch, self.model)


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    initializers = {init.name for init in model.graph.initializer}
    specs = []
    for info in model.graph.input:
        if info.name in initializers:
            continue
        tensor_type = info.type.tensor_type
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        specs.append(InputSpec(info.name, dtype, static_dims(tensor_type)))
    return specs


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray | NpzArray]:
    """The archive's arrays by name; large C-ordered members (pfp_onnx.npz.LAZY_BYTES) as NpzArrays, read a
    few rows at a time, so that memory does not grow with the number of points."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"Calibration file '{path}' does not exist. Pass an .npz file with --data.")
    save_it = "numpy.savez('calib.npz', <input name>=points, labels=optional_class_ids)"
    try:
        loaded = np.load(path, allow_pickle=False)
        if not hasattr(loaded, "files"):  # a .npy file: one bare array
            raise DataError(
                f"'{path}' holds a single NumPy array (.npy), but pfp-onnx reads an .npz archive of arrays "
                f"named after the model's inputs, so that it can match them (and class labels) to the model. "
                f"Make one from your array with {save_it}.")
        with loaded as archive:
            return {name: _member(path, archive, name) for name in archive.files}
    except DataError:
        raise
    except Exception as exc:  # numpy/zipfile/zlib raise many types for damaged archives
        raise DataError(
            f"Could not read '{path}' as a NumPy .npz archive ({exc}). Save the calibration set with {save_it}."
        ) from None


def _member(path: Path, archive, name: str) -> np.ndarray | NpzArray:
    member = name if name in archive.zip.namelist() else f"{name}.npy"
    if name != LABELS and NpzArray.opens(archive.zip, member):
        try:
            return NpzArray(path, member)
        except LoadWhole:
            pass
    return archive[name]


def validate(arrays: Mapping[str, np.ndarray | NpzArray], model: onnx.ModelProto) -> CalibrationData:
    """Match arrays to graph inputs and check names, ranks, fixed dims, dtypes, finiteness, counts and the
    labels' class range. A single-input model takes a single array of any name (with a DataNote)."""
    specs = input_specs(model)
    _check_batched(model, specs)
    arrays = dict(arrays)
    labels = arrays.pop(LABELS, None)
    expected = ", ".join(f"'{spec.name}' {_describe(spec)}" for spec in specs)
    if len(specs) == 1 and len(arrays) == 1 and specs[0].name not in arrays:
        (found, values), = arrays.items()
        warnings.warn(f"the calibration array '{found}' was taken as the model's only input, '{specs[0].name}' "
                      "(save it under the input's name to match it explicitly)", DataNote, stacklevel=2)
        arrays = {specs[0].name: values}
    missing = [spec.name for spec in specs if spec.name not in arrays]
    if missing:
        raise DataError(
            f"The calibration data has no array for model input(s) {', '.join(map(repr, missing))}. "
            f"The model expects {expected}; save one array per input under the input's name "
            f"(found: {', '.join(map(repr, arrays)) or 'none'}).")
    extra = sorted(set(arrays) - {spec.name for spec in specs})
    if extra:
        raise DataError(
            f"The calibration data holds arrays {', '.join(map(repr, extra))} that match no model input. "
            f"The model expects {expected} (plus an optional '{LABELS}' array); remove or rename them.")
    inputs = {spec.name: _checked(_array(arrays[spec.name]), spec) for spec in specs}
    counts = Counter(len(array) for array in inputs.values())
    if len(counts) != 1:
        raise DataError("The calibration arrays hold different numbers of points on axis 0 "
                        f"({', '.join(f'{n}: {len(a)}' for n, a in inputs.items())}); give every input the same "
                        f"count, the points stacked on axis 0.{_moved_points(inputs, counts.most_common(1)[0][0])}")
    count = next(iter(counts))
    if count == 0:
        raise DataError("The calibration data holds zero points; give at least a few dozen.")
    if labels is not None:
        labels = np.asarray(labels)
        if labels.ndim != 1 or len(labels) != count or not np.issubdtype(labels.dtype, np.integer):
            raise DataError(
                f"The '{LABELS}' array must be 1-D integer class ids, one per point ({count}); got shape "
                f"{labels.shape} and dtype {labels.dtype}. Fix or remove it.")
        _check_classes(labels, model)
    return CalibrationData(inputs, labels)


def _check_batched(model: onnx.ModelProto, specs: list[InputSpec]) -> None:
    """pfp-onnx feeds every input a batch of points sliced along axis 0: a scalar input has no such axis, and
    an input whose axis 0 is fixed while a later axis is open, beside inputs whose axis 0 is open, holds
    something other than points there, such as a recurrent state [2, N, 128]. A whole input fixed at axis 0
    (an LSTM state [1, 1, 128] beside audio [N, 576]) is a model exported for one batch size: it runs
    batches of exactly that size."""
    shaped = {info.name for info in model.graph.input if info.type.tensor_type.HasField("shape")}
    described = {spec.name: f"'{spec.name}' {_describe(spec)}" for spec in specs}
    problems = [f"{described[spec.name]} is a scalar" for spec in specs if spec.name in shaped and not spec.dims]
    fixed = [described[spec.name] for spec in specs if spec.dims and spec.dims[0] is not None
             and any(dim is None for dim in spec.dims[1:])]
    open_batch = [described[spec.name] for spec in specs if spec.dims and spec.dims[0] is None]
    if fixed and open_batch:
        problems.append(f"{', '.join(fixed)} {'fixes' if len(fixed) == 1 else 'fix'} axis 0 while "
                        f"{', '.join(open_batch)} {'leaves' if len(open_batch) == 1 else 'leave'} it open")
    elif len({spec.dims[0] for spec in specs if spec.dims and spec.dims[0] is not None}) > 1:
        problems.append(f"{', '.join(described[spec.name] for spec in specs if spec.dims and spec.dims[0])} fix "
                        "axis 0 to different sizes")
    if problems:
        raise DataError(
            "pfp-onnx needs every model input to carry the calibration points on axis 0 (it feeds each input a "
            f"batch of points along that axis), and this model's do not: {'; '.join(problems)}. Scalars, "
            "recurrent states and per-call parameters cannot be batched that way: export a model whose inputs "
            "all take the batch on axis 0, with the others made constants of the graph (re-export with them "
            "fixed, or replace such an input by an initializer holding the value you would pass, e.g. with "
            "onnx-graphsurgeon), and prune that model.")


def _moved_points(inputs: Mapping[str, np.ndarray | NpzArray], count: int) -> str:
    """A hint naming the arrays that seem to hold their `count` points on another axis than 0."""
    moved = [f"'{name}' holds {count} on axis {array.shape.index(count)}" for name, array in inputs.items()
             if len(array) != count and count in array.shape[1:]]
    return f" ({'; '.join(moved)}: move that axis first, numpy.moveaxis(array, axis, 0).)" if moved else ""


def _check_classes(labels: np.ndarray, model: onnx.ModelProto) -> None:
    """Labels outside a classifier's class range (its first output's [N, classes]) can never match a
    prediction, so accuracy would read low (0% for labels all shifted) without a word: they are refused."""
    if not len(labels) or not model.graph.output:
        return
    output = model.graph.output[0]
    dims = static_dims(output.type.tensor_type)
    if len(dims) != 2 or dims[1] is None or dims[1] < 2:
        return
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= dims[1]:
        raise DataError(
            f"The '{LABELS}' array holds class ids from {low} to {high}, but the model's first output "
            f"'{output.name}' scores {dims[1]} classes (ids 0 to {dims[1] - 1}): a point labelled outside them always "
            "counts as wrong. Map the labels to the model's class ids (1-based ids: subtract 1), or leave the "
            f"'{LABELS}' array out to compare the models without accuracy.")


def _array(values) -> np.ndarray | NpzArray:
    return values if isinstance(values, NpzArray) else np.asarray(values)


def _checked(array: np.ndarray | NpzArray, spec: InputSpec) -> np.ndarray | NpzArray:
    if array.ndim == 0:
        raise DataError(
            f"Calibration array '{spec.name}' is a single value, not points: the model input is "
            f"{_describe(spec)}. Stack the points along axis 0 in the model's layout.")
    if array.ndim != len(spec.dims):
        raise DataError(
            f"Calibration array '{spec.name}' has rank {array.ndim} (shape {array.shape}) but the model input "
            f"has rank {len(spec.dims)} {_describe(spec)}. Stack the points along axis 0 in the model's layout.")
    for axis, (size, expected) in enumerate(zip(array.shape, spec.dims)):
        if axis > 0 and expected is not None and size != expected:
            raise DataError(
                f"Calibration array '{spec.name}' has size {size} on axis {axis} but the model fixes it to "
                f"{expected} {_describe(spec)}. Resize or transpose the data to the model's input layout.")
    if array.dtype != spec.dtype:
        raise DataError(
            f"Calibration array '{spec.name}' has dtype {array.dtype} but the model input is {spec.dtype}. "
            f"Convert it, e.g. array.astype(numpy.{spec.dtype}).")
    bad = 0
    if isinstance(array, NpzArray):
        bad = array.nonfinite  # counted when the archive was opened
    elif np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
        bad = int(np.count_nonzero(~np.isfinite(array)))
    if bad:
        raise DataError(
            f"Calibration array '{spec.name}' holds {bad} NaN or infinite value(s). Clean or drop those "
            "points before pruning.")
    return array


def _describe(spec: InputSpec) -> str:
    dims = ", ".join("?" if dim is None else str(dim) for dim in spec.dims)
    return f"[{dims}] {spec.dtype}"


def points_in(batch: Mapping[str, np.ndarray]) -> int:
    """How many points a batch holds (every array has them on axis 0)."""
    return len(next(iter(batch.values())))


def model_feeds(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A batch without its labels: what onnxruntime is fed."""
    return {name: array for name, array in batch.items() if name != LABELS}


def whole_batches(data: CalibrationData | StreamedData | None,
                  batch: int | None) -> tuple[CalibrationData | StreamedData | None, int]:
    """The data without the last points that do not fill a batch of `batch` (a model exported with a fixed
    batch size runs nothing else), and how many were left out (streamed data is re-cut as it streams, and
    leaves out its last points unsaid)."""
    if data is None or not batch or batch == 1:
        return data, 0
    if isinstance(data, StreamedData):
        exact = copy.copy(data)
        exact.exact = batch
        return exact, 0
    left_out = data.count % batch
    return (data.subset(np.arange(data.count - left_out)) if left_out else data), left_out


def split(data: CalibrationData | StreamedData, holdout: float,
          seed: int) -> tuple[CalibrationData | StreamedData, CalibrationData | StreamedData | None]:
    """Sensitivity part and held-out verification part, chosen by a seeded permutation."""
    if isinstance(data, StreamedData):
        return data.split(holdout, seed)
    if not 0 <= holdout < 1:
        raise DataError(f"--holdout must be in [0, 1); got {holdout}.")
    held = int(round(data.count * holdout))
    if holdout > 0:
        held = max(held, 1)
    if data.count - held < 1 or (holdout > 0 and data.count < 2):
        raise DataError(
            f"{data.count} calibration point(s) are too few to keep {holdout:.0%} for verification and "
            "still have points for sensitivity. Give more points or lower --holdout.")
    order = np.random.default_rng(seed).permutation(data.count)
    sensitivity_part = data.subset(np.sort(order[held:]))
    return sensitivity_part, (data.subset(np.sort(order[:held])) if held else None)
