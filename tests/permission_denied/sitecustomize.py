"""Permission errors for root, who reads and writes regardless of permission bits.

test_bad_input_matrix.py puts this folder on PYTHONPATH of the CLI processes it starts as root, so that
Python imports this module at start-up. It makes the two answers the operating system gives an ordinary
user for a chmod'ed path: opening PFP_TEST_UNREADABLE raises PermissionError, and os.access says the folder
PFP_TEST_UNWRITABLE is not writable. Everything else is left as it is.
"""

from __future__ import annotations

import builtins
import errno
import os

_unreadable = os.environ.get("PFP_TEST_UNREADABLE")
_unwritable = os.environ.get("PFP_TEST_UNWRITABLE")
_open, _access = builtins.open, os.access


def _is(path, denied: str) -> bool:
    return isinstance(path, (str, bytes, os.PathLike)) and os.path.realpath(path) == os.path.realpath(denied)


def _open_unless_denied(file, *args, **kwargs):
    if _is(file, _unreadable):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fsdecode(file))
    return _open(file, *args, **kwargs)


def _access_unless_denied(path, mode, *args, **kwargs):
    if _unreadable and _is(path, _unreadable):
        return False
    if _unwritable and mode & os.W_OK and _is(path, _unwritable):
        return False
    return _access(path, mode, *args, **kwargs)


if _unreadable:
    builtins.open = _open_unless_denied
if _unreadable or _unwritable:
    os.access = _access_unless_denied
