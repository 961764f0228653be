"""Reads PyTorch state dicts (legacy and zip formats) into numpy arrays without torch or pickle."""

from __future__ import annotations

import io
import pickletools
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# The only globals a weights file may name: tensor storages and the state-dict container.
_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class WeightsFormatError(ValueError):
    """The file is not a plain PyTorch state dict of tensors."""


@dataclass
class _StorageRef:
    key: str
    dtype: np.dtype
    data: np.ndarray | None = None


@dataclass
class _TensorRef:
    storage: _StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    def materialise(self) -> np.ndarray:
        flat = self.storage.data
        if flat is None:
            raise WeightsFormatError(f"storage {self.storage.key} has no data")
        itemsize = flat.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            flat[self.offset :], shape=self.shape, strides=tuple(s * itemsize for s in self.stride)
        )
        return np.array(view, copy=True)


class _Global:
    def __init__(self, module: str, name: str) -> None:
        self.qualname = f"{module}.{name}"
        self.name = name


def _interpret(ops, storages: dict[str, _StorageRef]):
    """Evaluates one pickle's opcodes, allowing only the objects a state dict is made of."""
    stack: list = []
    marks: list[int] = []
    memo: dict[int, object] = {}

    def pop_mark() -> list:
        start = marks.pop()
        items = stack[start:]
        del stack[start:]
        return items

    for op, arg, _pos in ops:
        name = op.name
        if name in ("PROTO", "FRAME"):
            continue
        if name == "STOP":
            return stack.pop()
        if name == "MARK":
            marks.append(len(stack))
        elif name in ("BINPUT", "LONG_BINPUT", "PUT"):
            memo[arg] = stack[-1]
        elif name == "MEMOIZE":
            memo[len(memo)] = stack[-1]
        elif name in ("BINGET", "LONG_BINGET", "GET"):
            stack.append(memo[arg])
        elif name in ("BININT", "BININT1", "BININT2", "LONG1", "LONG4", "INT", "LONG", "BINFLOAT", "FLOAT"):
            stack.append(arg)
        elif name in ("BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING",
                      "BINSTRING", "STRING"):
            stack.append(arg)
        elif name == "NONE":
            stack.append(None)
        elif name in ("NEWTRUE", "NEWFALSE"):
            stack.append(name == "NEWTRUE")
        elif name == "EMPTY_TUPLE":
            stack.append(())
        elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
            count = int(name[-1])
            items = tuple(stack[-count:])
            del stack[-count:]
            stack.append(items)
        elif name == "TUPLE":
            stack.append(tuple(pop_mark()))
        elif name == "EMPTY_LIST":
            stack.append([])
        elif name == "APPEND":
            value = stack.pop()
            stack[-1].append(value)
        elif name == "APPENDS":
            items = pop_mark()
            stack[-1].extend(items)
        elif name == "EMPTY_DICT":
            stack.append({})
        elif name == "SETITEM":
            value = stack.pop()
            key = stack.pop()
            stack[-1][key] = value
        elif name == "SETITEMS":
            items = pop_mark()
            target = stack[-1]
            for i in range(0, len(items), 2):
                target[items[i]] = items[i + 1]
        elif name in ("GLOBAL", "STACK_GLOBAL"):
            if name == "GLOBAL":
                module, _, attr = arg.partition(" ")
            else:
                attr = stack.pop()
                module = stack.pop()
            stack.append(_global(module, attr))
        elif name == "BINPERSID":
            stack.append(_persistent(stack.pop(), storages))
        elif name == "REDUCE":
            args = stack.pop()
            func = stack.pop()
            stack.append(_reduce(func, args))
        elif name == "BUILD":
            stack.pop()  # OrderedDict's _metadata (per-module versions): not needed for weights.
        else:
            raise WeightsFormatError(f"unsupported pickle opcode {name} in a weights file")
    raise WeightsFormatError("pickle ended without STOP")


def _global(module: str, name: str) -> _Global:
    if (module, name) in (("collections", "OrderedDict"), ("torch._utils", "_rebuild_tensor_v2"),
                          ("torch._utils", "_rebuild_tensor")):
        return _Global(module, name)
    if module == "torch" and name in _STORAGE_DTYPES:
        return _Global(module, name)
    if module == "torch" and name == "UntypedStorage":
        return _Global(module, name)
    raise WeightsFormatError(f"refusing global {module}.{name}: a weights file holds only tensors")


def _persistent(pid, storages: dict[str, _StorageRef]) -> _StorageRef:
    if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
        raise WeightsFormatError(f"unexpected persistent id {pid!r}")
    storage_type, key = pid[1], str(pid[2])
    if not isinstance(storage_type, _Global) or storage_type.name not in _STORAGE_DTYPES:
        raise WeightsFormatError(f"unsupported storage type in {pid!r}")
    ref = storages.setdefault(key, _StorageRef(key, np.dtype(_STORAGE_DTYPES[storage_type.name])))
    return ref


def _reduce(func, args):
    if not isinstance(func, _Global):
        raise WeightsFormatError("REDUCE on a non-global")
    if func.name == "OrderedDict":
        return OrderedDict(*args)
    if func.name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
        storage, offset, shape, stride = args[:4]
        return _TensorRef(storage, int(offset), tuple(shape), tuple(stride))
    raise WeightsFormatError(f"refusing to call {func.qualname}")


def _read_legacy(raw: bytes) -> OrderedDict:
    stream = io.BytesIO(raw)
    storages: dict[str, _StorageRef] = {}
    magic = _interpret(pickletools.genops(stream), storages)
    if magic != _LEGACY_MAGIC:
        raise WeightsFormatError("not a PyTorch weights file (bad magic number)")
    _interpret(pickletools.genops(stream), storages)  # protocol version
    _interpret(pickletools.genops(stream), storages)  # sys info (endianness, type sizes)
    state = _interpret(pickletools.genops(stream), storages)
    keys = _interpret(pickletools.genops(stream), storages)
    for key in keys:
        ref = storages[str(key)]
        count = int.from_bytes(stream.read(8), "little")
        nbytes = count * ref.dtype.itemsize
        buffer = stream.read(nbytes)
        if len(buffer) != nbytes:
            raise WeightsFormatError(f"storage {key} is truncated")
        ref.data = np.frombuffer(buffer, dtype=ref.dtype)
    return state


def _read_zip(path: Path) -> OrderedDict:
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        root = names[0].split("/")[0]
        storages: dict[str, _StorageRef] = {}
        state = _interpret(pickletools.genops(io.BytesIO(archive.read(f"{root}/data.pkl"))), storages)
        for key, ref in storages.items():
            ref.data = np.frombuffer(archive.read(f"{root}/data/{key}"), dtype=ref.dtype)
    return state


def load_state_dict(path: str | Path) -> OrderedDict[str, np.ndarray]:
    """Returns a PyTorch state dict's tensors as numpy arrays, refusing anything but tensors."""
    path = Path(path)
    state = _read_zip(path) if zipfile.is_zipfile(path) else _read_legacy(path.read_bytes())
    if not isinstance(state, dict):
        raise WeightsFormatError("the file does not hold a state dict")
    out: OrderedDict[str, np.ndarray] = OrderedDict()
    for name, value in state.items():
        if not isinstance(value, _TensorRef):
            raise WeightsFormatError(f"entry {name} is not a tensor")
        out[name] = value.materialise()
    return out
