"""Running a model piece by piece, with what crosses between pieces kept in memory or on disk, computes what
the whole model computes (up to the rounding of operators onnxruntime fuses differently across a border)."""

from __future__ import annotations

import numpy as np
import pytest

from pfp_onnx.runtime import choose_device, create_session
from pfp_onnx.recovery.segments import MEMORY_BYTES, ActivationCache, backward_closure, element_types, segment
from pfp_onnx.model import with_outputs
from zoo import ZOO, random_inputs


@pytest.mark.parametrize("memory_bytes", [0, MEMORY_BYTES])
def test_pieces_compute_what_the_whole_model_computes(memory_bytes):
    """The residual miniature's conv inputs, read in order of depth over three batches: each piece starts
    from what earlier pieces kept (a skip connection's source among them), and every value equals a run of
    the whole model."""
    model = ZOO["residual"]()
    convs = [node for node in model.graph.node if node.op_type in ("Conv", "Gemm")]
    wanted = [[node.input[0]] for node in convs]
    types = element_types(model)
    data = random_inputs(model, 12, seed=3)
    batches = [{name: array[start:start + 5] for name, array in data.items()} for start in range(0, 12, 5)]
    whole = create_session(with_outputs(model, [name for names in wanted for name in names]), choose_device("cpu"))
    cache = ActivationCache(memory_bytes)
    read_from_cache = 0
    try:
        for index, names in enumerate(wanted):
            later = backward_closure(model, [name for rest in wanted[index + 1:] for name in rest])
            piece, reads, outputs = segment(model, cache.names, names, later, types)
            read_from_cache += len(reads)
            session = create_session(piece, choose_device("cpu")) if piece is not None else None
            kept_earlier = [name for name in names if name in cache.names]
            for number, batch in enumerate(batches):
                values = {name: batch[name] for name in names if name in batch}
                values.update(cache.read(number, kept_earlier))
                if session is not None:
                    inputs = [info.name for info in piece.graph.input if info.name not in reads]
                    computed = dict(zip(outputs, session.run(outputs, {name: batch[name] for name in inputs}
                                                             | cache.read(number, reads))))
                    cache.write(number, {name: value for name, value in computed.items() if name in later})
                    values.update(computed)
                expected = dict(zip(names, whole.run(names, batch)))
                for name in names:  # onnxruntime fuses across a piece's border differently: float rounding
                    np.testing.assert_allclose(values[name], expected[name], rtol=1e-5,
                                               atol=1e-6 * np.abs(expected[name]).max())
            cache.forget(cache.names - later)
        assert read_from_cache > 0, "later pieces started from kept tensors"
        assert not cache.names
    finally:
        cache.close()
    assert not cache._folder.exists()


@pytest.mark.parametrize("memory_bytes, files", [(0, 4), (40, 2), (MEMORY_BYTES, 0)])
def test_a_forgotten_tensor_never_shares_files_with_a_later_one(memory_bytes, files):
    """The same values whether held in memory or in files, or split between them (40 bytes hold a and b;
    a forgotten frees its room for the scalar, while d goes to a file)."""
    cache = ActivationCache(memory_bytes)
    try:
        cache.write(0, {"a": np.zeros(2), "b": np.ones(3), "c": np.full(4, 2.0)})
        cache.forget(["a"])
        cache.write(0, {"d": np.full(5, 7.0)})
        values = cache.read(0, ["b", "c", "d"])
        assert [value.tolist() for value in values.values()] == [[1.0] * 3, [2.0] * 4, [7.0] * 5]
        cache.write(1, {"scalar": np.array(3.0)})
        assert cache.read(1, ["scalar"])["scalar"].shape == ()  # 0-d stays 0-d (a shape value)
        assert len(list(cache._folder.glob("*.npy"))) == files
    finally:
        cache.close()
