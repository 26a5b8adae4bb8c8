"""Reading PyTorch weight files into ``{key: numpy array}`` without executing any code.

- ``.safetensors``: through the ``safetensors`` package's numpy API (a JSON header and
  raw little-endian buffers: nothing to execute by construction).
- ``.pt`` / ``.pth`` / ``.bin`` written by ``torch.save`` (the zip format of torch >= 1.6):
  ``data.pkl`` is read by a restricted unpickler that knows three things only: the typed
  storage classes, the tensor-rebuild function and ``collections.OrderedDict``. Any other
  global a pickle asks for (where a malicious file would hide ``os.system``) is refused in
  one line, with the torch command that re-saves the file as safetensors. Storages are the
  archive's ``data/<key>`` entries, read as numpy buffers; a tensor is a strided view of
  one, copied.

torch is never imported: a converted model is checked against PyTorch's outputs by golden
fixtures recorded once (tests/golden/make_torch_fixtures.py), not at run time.
"""

from __future__ import annotations

import collections
import os
import pickle
import zipfile
from typing import Any, Dict

import ml_dtypes
import numpy as np


class ConversionError(ValueError):
    """A weight file or config the converter cannot take, named in one line with the fix."""


# torch's typed storages (the class named in each storage's persistent id) -> numpy dtype.
_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


def resave_hint(path: str) -> str:
    """The one-line torch command that turns a torch pickle into a safetensors file."""
    out = os.path.splitext(path)[0] + ".safetensors"
    return (
        're-save it as safetensors on a machine with torch: python -c "import torch, '
        f"safetensors.torch as s; s.save_file(torch.load('{path}', map_location='cpu', "
        f"weights_only=True), '{out}')\" and pass --weights={out}"
    )


def read_weights(path: str) -> Dict[str, np.ndarray]:
    """``{key: array}`` of a safetensors file or a torch.save zip archive (a state dict, or
    a training checkpoint dict whose "ema" / "model" / "state_dict" entry is one)."""
    if not os.path.isfile(path):
        raise ConversionError(f"weights file {path!r} not found")
    if path.endswith(".safetensors"):
        return read_safetensors(path)
    tensors = read_torch_zip(path)
    return _state_dict_of(tensors, path)


def read_safetensors(path: str) -> Dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return dict(load_file(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ConversionError(f"{path} is not a readable safetensors file: {e}") from None


def _state_dict_of(obj: Any, path: str) -> Dict[str, np.ndarray]:
    if isinstance(obj, dict) and obj and all(isinstance(v, np.ndarray) for v in obj.values()):
        return dict(obj)
    if isinstance(obj, dict):
        for key in ("ema", "model", "state_dict"):
            if key in obj:
                return _state_dict_of(obj[key], path)
    raise ConversionError(
        f"{path} holds no state dict of tensors (a dict of keys -> tensors, or a checkpoint "
        "with an 'ema'/'model'/'state_dict' entry)"
    )


class _StorageType:
    """Stands for a torch storage class inside the pickle: only its dtype matters."""

    def __init__(self, dtype):
        self.dtype = np.dtype(dtype)


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, *meta):
    """torch._utils._rebuild_tensor_v2: a strided view of a flat storage, copied."""
    del requires_grad, hooks, meta
    itemsize = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage[offset:], shape=tuple(size), strides=tuple(s * itemsize for s in stride)
    )
    return np.array(view)


def _rebuild_parameter(data, requires_grad=False, hooks=None):
    """torch._utils._rebuild_parameter: a Parameter is its data."""
    del requires_grad, hooks
    return data


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, path: str):
        super().__init__(file)
        self._archive, self._prefix, self._path = archive, prefix, path
        self._storages: Dict[str, np.ndarray] = {}

    def find_class(self, module: str, name: str):
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        raise ConversionError(
            f"{self._path} asks to load {module}.{name}, which a weights file never needs "
            f"(only tensors are read, no code is run); {resave_hint(self._path)}"
        )

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise ConversionError(f"{self._path}: unknown persistent id {pid!r}")
        _, storage_type, key, _location, _numel = pid
        if key not in self._storages:
            raw = self._archive.read(f"{self._prefix}/data/{key}")
            self._storages[key] = np.frombuffer(raw, dtype=storage_type.dtype.newbyteorder("<"))
        return self._storages[key]


def read_torch_zip(path: str) -> Any:
    """The unpickled object of a torch.save zip archive, tensors as numpy arrays."""
    if not zipfile.is_zipfile(path):
        raise ConversionError(
            f"{path} is neither a safetensors file nor a torch.save zip archive (the legacy "
            f"pre-1.6 torch format is not read); {resave_hint(path)}"
        )
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise ConversionError(f"{path}: expected one */data.pkl in the archive")
        prefix = pickles[0][: -len("/data.pkl")]
        byteorder = f"{prefix}/byteorder"
        if byteorder in archive.namelist() and archive.read(byteorder).strip() != b"little":
            raise ConversionError(f"{path} was saved on a big-endian machine; {resave_hint(path)}")
        with archive.open(pickles[0]) as f:
            try:
                return _RestrictedUnpickler(f, archive, prefix, path).load()
            except (pickle.UnpicklingError, EOFError, KeyError) as e:
                raise ConversionError(f"{path}: corrupt torch archive ({e})") from None


__all__ = ("ConversionError", "read_weights", "read_safetensors", "read_torch_zip", "resave_hint")
