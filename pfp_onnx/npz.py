"""Large arrays of an .npz archive, read from the file a few rows at a time.

An ImageNet-sized calibration set (2,048 images of 3×224×224 float32) is 1.2 GB; loading it whole would make
compress's memory grow with the number of points. A member above LAZY_BYTES is instead read on demand:
each request for rows (increasing, as the batches of one pass ask for them) continues one forward stream
through the member — stored or deflated alike — and skips the rows it does not need, so a pass reads the
file once and holds one batch. Opening scans the member once, which checks the archive (a damaged deflate
stream or CRC fails here, as a user error, not in the middle of a capture) and counts non-finite values.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from pfp_onnx.errors import DataError

__all__ = ["LAZY_BYTES", "LoadWhole", "NpzArray"]

# Members larger than this (uncompressed) are read row by row; smaller ones are simply loaded.
LAZY_BYTES = 64 * 2**20
# Bytes read at a time when scanning or skipping rows (zipfile copies each read once more).
READ_BYTES = 2 * 2**20


class LoadWhole(Exception):
    """A member that cannot be read row by row (Fortran order, objects, a scalar, a newer .npy format):
    the caller loads it whole instead."""


class NpzArray:
    """One C-ordered array of an .npz archive: shape, dtype and len() like an ndarray, and rows by
    `array[slice]` or `array[indices]` (a new ndarray), read from the file."""

    def __init__(self, path: str | Path, member: str) -> None:
        self._path, self._member = Path(path), member
        self._archive: zipfile.ZipFile | None = None
        self._stream = None
        self._next_row = 0  # the row the open stream reads next
        with zipfile.ZipFile(self._path) as archive, archive.open(member) as stream:
            version = np.lib.format.read_magic(stream)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
            else:
                raise LoadWhole(f".npy format version {version}")
            if fortran or dtype.hasobject or not shape:
                raise LoadWhole("not a C-ordered array of numbers with a points axis")
            self.shape, self.dtype = tuple(int(size) for size in shape), np.dtype(dtype)
            self._header_bytes = stream.tell()
            self.nonfinite = self._scan(stream)

    @staticmethod
    def opens(archive: zipfile.ZipFile, member: str) -> bool:
        """Whether `member` is large enough to be read row by row."""
        return archive.getinfo(member).file_size > LAZY_BYTES

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        """Every row (what np.asarray asks for): the whole array in memory."""
        whole = self[:]
        return whole if dtype is None else whole.astype(dtype)

    def __getitem__(self, index) -> np.ndarray:
        rows = np.arange(len(self))[index] if isinstance(index, slice) else np.asarray(index, dtype=np.int64)
        if rows.ndim != 1:
            raise IndexError("NpzArray takes a slice or a 1-D array of row indices")
        wanted, where = np.unique(rows, return_inverse=True)
        if len(wanted) and not 0 <= wanted[0] <= wanted[-1] < len(self):
            raise IndexError(f"row indices outside [0, {len(self)})")
        out = np.empty((len(wanted), *self.shape[1:]), dtype=self.dtype)
        try:
            self._read_rows(wanted, out)
        except (OSError, EOFError, ValueError, zipfile.BadZipFile) as exc:
            self.close()
            raise DataError(f"Could not read the calibration file '{self._path}' any more ({exc}); it must not "
                            "change while pfp-onnx runs.") from None
        return out if len(wanted) == len(rows) and np.array_equal(wanted, rows) else out[where]

    def close(self) -> None:
        for handle in (getattr(self, "_stream", None), getattr(self, "_archive", None)):
            if handle is not None:
                handle.close()
        self._stream = self._archive = None
        self._next_row = 0

    def __del__(self) -> None:
        self.close()

    # ---- reading --------------------------------------------------------------------------------------
    @property
    def _row_bytes(self) -> int:
        return self.dtype.itemsize * int(np.prod(self.shape[1:], dtype=np.int64))

    def _scan(self, stream) -> int:
        """Read every row once, counting non-finite values; returns that count (0 for integer dtypes)."""
        per_read = max(1, READ_BYTES // max(1, self._row_bytes))
        nonfinite = 0
        for start in range(0, len(self), per_read):
            count = min(per_read, len(self) - start)
            block = np.empty((count, *self.shape[1:]), dtype=self.dtype)
            _fill(stream, block)
            if np.issubdtype(self.dtype, np.inexact):
                nonfinite += int(np.count_nonzero(~np.isfinite(block)))
        if stream.read(1):
            raise ValueError("the member holds more bytes than its header says")
        return nonfinite

    def _read_rows(self, rows: np.ndarray, out: np.ndarray) -> None:
        """Fill `out` with the sorted, distinct `rows`, continuing the open stream when they lie ahead."""
        if not len(rows):
            return
        if self._stream is None or rows[0] < self._next_row:
            self.close()
            self._archive = zipfile.ZipFile(self._path)
            self._stream = self._archive.open(self._member)
            self._skip(self._header_bytes)
        # runs of consecutive rows: one read each
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        for first, last in zip(np.r_[0, breaks], np.r_[breaks, len(rows)]):
            self._skip((int(rows[first]) - self._next_row) * self._row_bytes)
            _fill(self._stream, out[first:last])
            self._next_row = int(rows[last - 1]) + 1

    def _skip(self, count: int) -> None:
        while count > 0:
            skipped = len(self._stream.read(min(count, READ_BYTES)))
            if not skipped:
                raise EOFError("the member ended early")
            count -= skipped


def _fill(stream, block: np.ndarray) -> None:
    """Read exactly block.nbytes from the stream into the C-contiguous `block`."""
    view = memoryview(block.reshape(-1).view(np.uint8))
    filled = 0
    while filled < len(view):
        count = stream.readinto(view[filled:])
        if not count:
            raise EOFError("the member ended early")
        filled += count
