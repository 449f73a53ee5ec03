"""Pickle machinery for the pickle-based checkpoint formats (.pdparams, torch zip).

Reading: `scan_pickle` runs a restricted pickle VM of our own. Nothing from the file is imported or
called: allow-listed globals become `Global` placeholders, their calls become `Reduced` placeholders,
and byte payloads stay in the file as `FileSpan`s, so scanning costs memory in proportion to the
pickle's structure, not to its tensor data. `read_span_into` later fills an array from one span.

Writing: `PickleEmitter` writes opcodes straight to a stream; the caller writes array payloads
after `bytes_header` straight from the array's memory, without an intermediate `bytes` copy.
"""

from __future__ import annotations

import _compat_pickle
import codecs
import io
import math
import os
import struct
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np

from vlhub.errors import CorruptCheckpoint, UnsafePickle
from vlhub.formats.io_utils import read_exact_into

# Strings longer than this are left in the file: a protocol-2 pickle stores tensor bytes as text.
_INLINE_TEXT_LIMIT = 1 << 12
_GLOBAL_LINE_LIMIT = 1024
_READ_CHUNK = 1 << 22
_MAX_DIMS = 64


@dataclass(frozen=True)
class Global:
    """An allow-listed global named by the pickle; never imported."""

    module: str
    name: str

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.name}"


_UNBUILT = object()


@dataclass(eq=False)
class Reduced:
    """The placeholder for `func(*args)` (REDUCE) and the state a later BUILD gave it; never called."""

    func: Global
    args: tuple[Any, ...]
    state: Any = _UNBUILT

    @property
    def built(self) -> bool:
        return self.state is not _UNBUILT


@dataclass(frozen=True)
class FileSpan:
    """Bytes left in the file: `length` bytes at `offset`.

    With `utf8_latin1` the span is UTF-8 text whose characters are the bytes (protocol 2 stores
    bytes as `_codecs.encode(text, "latin1")`), so it decodes to between length/2 and length bytes.
    """

    offset: int
    length: int
    utf8_latin1: bool = False

    def may_hold(self, nbytes: int) -> bool:
        """Whether this span can decode to exactly `nbytes` bytes."""
        if self.utf8_latin1:
            return nbytes <= self.length <= 2 * nbytes
        return self.length == nbytes


@dataclass(frozen=True)
class FileText:
    """A long string left in the file: `length` UTF-8 bytes at `offset`."""

    offset: int
    length: int


ByteSource = bytes | FileSpan
PersistentLoad = Callable[[Any], Any]

_SCALAR_KEY_TYPES = (str, int, float, bool, type(None), bytes)


def read_span_into(stream: BinaryIO, source: ByteSource, out: np.ndarray, where: str) -> None:
    """Fill `out` (flat uint8) exactly with the bytes of `source`, or raise `CorruptCheckpoint`."""
    if isinstance(source, bytes):
        if len(source) != out.size:
            raise CorruptCheckpoint(f"{where}: payload holds {len(source)} bytes, expected {out.size}")
        out[:] = np.frombuffer(source, dtype=np.uint8)
        return
    if not source.utf8_latin1:
        if source.length != out.size:
            raise CorruptCheckpoint(f"{where}: payload holds {source.length} bytes, expected {out.size}")
        read_exact_into(stream, source.offset, out, where)
        return
    stream.seek(source.offset)
    decoder = codecs.getincrementaldecoder("utf-8")()
    filled = 0
    remaining = source.length
    try:
        while remaining:
            chunk = stream.read(min(remaining, _READ_CHUNK))
            if not chunk:
                raise CorruptCheckpoint(f"{where}: file is truncated inside a tensor payload")
            remaining -= len(chunk)
            decoded = decoder.decode(chunk, final=remaining == 0).encode("latin-1")
            if filled + len(decoded) > out.size:
                raise CorruptCheckpoint(f"{where}: payload holds more than the expected {out.size} bytes")
            out[filled : filled + len(decoded)] = np.frombuffer(decoded, dtype=np.uint8)
            filled += len(decoded)
    except UnicodeError as exc:
        raise CorruptCheckpoint(f"{where}: tensor payload is not latin-1 text ({exc.reason})") from None
    if filled != out.size:
        raise CorruptCheckpoint(f"{where}: payload holds {filled} bytes, expected {out.size}")


def stream_size(stream: BinaryIO) -> int:
    """The total size of a seekable stream, leaving its position unchanged."""
    position = stream.tell()
    size = stream.seek(0, os.SEEK_END)
    stream.seek(position)
    return size


def scan_pickle(
    stream: BinaryIO,
    where: str,
    allowed_globals: Collection[str],
    persistent_load: PersistentLoad | None = None,
) -> Any:
    """Run the restricted VM over the pickle at the stream's position and return its root value.

    `allowed_globals` holds qualified names ("numpy.dtype"); any other global raises `UnsafePickle`
    as soon as it is named. `persistent_load` receives each BINPERSID id and returns its placeholder.
    """
    return _Scanner(stream, where, frozenset(allowed_globals), persistent_load).run()


def _pure_ordered_dict(args: tuple[Any, ...]) -> Any:
    if args != ():
        raise TypeError("OrderedDict takes no arguments here")
    return {}


def _pure_bytes(args: tuple[Any, ...]) -> Any:
    # protocol 2 pickles an empty bytes object as `bytes()`
    if args != ():
        raise TypeError("bytes() takes no arguments here")
    return b""


def _pure_codecs_encode(args: tuple[Any, ...]) -> Any:
    if len(args) != 2 or args[1] not in ("latin1", "latin-1"):
        raise TypeError("_codecs.encode is only used as encode(text, 'latin1')")
    text = args[0]
    if isinstance(text, FileText):
        return FileSpan(text.offset, text.length, utf8_latin1=True)
    if isinstance(text, str):
        return text.encode("latin-1")
    raise TypeError("_codecs.encode needs text")


# Calls the VM evaluates itself because their results are plain data; still subject to the allow-list.
_PURE_CALLS: dict[str, Callable[[tuple[Any, ...]], Any]] = {
    "collections.OrderedDict": _pure_ordered_dict,
    "builtins.bytes": _pure_bytes,
    "_codecs.encode": _pure_codecs_encode,
}


class _Scanner:
    """One pass of the restricted VM over one pickle."""

    def __init__(
        self, stream: BinaryIO, where: str, allowed: frozenset[str], persistent_load: PersistentLoad | None
    ) -> None:
        self.stream = stream
        self.where = where
        self.allowed = allowed
        self.persistent_load = persistent_load
        self.end = stream_size(stream)
        self.protocol = 0
        self.stack: list[Any] = []
        self.marks: list[int] = []
        self.memo: dict[int, Any] = {}
        self.dispatch: dict[int, Callable[[], None]] = {
            0x80: self.op_proto,
            0x95: self.op_frame,
            ord("("): self.op_mark,
            ord(")"): lambda: self.stack.append(()),
            ord("t"): lambda: self.stack.append(tuple(self.pop_mark())),
            0x85: lambda: self.push_tuple(1),
            0x86: lambda: self.push_tuple(2),
            0x87: lambda: self.push_tuple(3),
            ord("]"): lambda: self.stack.append([]),
            ord("}"): lambda: self.stack.append({}),
            ord("a"): self.op_append,
            ord("e"): self.op_appends,
            ord("s"): self.op_setitem,
            ord("u"): self.op_setitems,
            ord("J"): lambda: self.stack.append(self.unpack("<i", 4)),
            ord("K"): lambda: self.stack.append(self.read(1)[0]),
            ord("M"): lambda: self.stack.append(self.unpack("<H", 2)),
            0x8A: self.op_long1,
            ord("G"): lambda: self.stack.append(self.unpack(">d", 8)),
            ord("N"): lambda: self.stack.append(None),
            0x88: lambda: self.stack.append(True),
            0x89: lambda: self.stack.append(False),
            0x8C: lambda: self.push_text(self.read(1)[0]),
            ord("X"): lambda: self.push_text(self.unpack("<I", 4)),
            0x8D: lambda: self.push_text(self.unpack("<Q", 8)),
            ord("C"): lambda: self.push_span(self.read(1)[0]),
            ord("B"): lambda: self.push_span(self.unpack("<I", 4)),
            0x8E: lambda: self.push_span(self.unpack("<Q", 8)),
            0x96: lambda: self.push_span(self.unpack("<Q", 8)),
            ord("c"): self.op_global,
            0x93: self.op_stack_global,
            ord("R"): self.op_reduce,
            ord("b"): self.op_build,
            ord("Q"): self.op_binpersid,
            0x94: lambda: self.memo.__setitem__(len(self.memo), self.top()),
            ord("q"): lambda: self.memo.__setitem__(self.read(1)[0], self.top()),
            ord("r"): lambda: self.memo.__setitem__(self.unpack("<I", 4), self.top()),
            ord("h"): lambda: self.push_memo(self.read(1)[0]),
            ord("j"): lambda: self.push_memo(self.unpack("<I", 4)),
        }

    def run(self) -> Any:
        try:
            while True:
                opcode = self.read(1)[0]
                if opcode == ord("."):
                    return self.pop()
                handler = self.dispatch.get(opcode)
                if handler is None:
                    raise self.corrupt(f"unsupported pickle opcode {bytes([opcode])!r} (0x{opcode:02x})")
                handler()
        except (TypeError, ValueError) as exc:
            # unhashable keys, non-latin-1 text, bad UTF-8 and the like: the stream is malformed
            raise self.corrupt(f"malformed pickle ({exc})") from None

    def corrupt(self, what: str) -> CorruptCheckpoint:
        return CorruptCheckpoint(f"{self.where}: {what} at byte {self.stream.tell()}")

    def read(self, n: int) -> bytes:
        data = self.stream.read(n)
        if len(data) != n:
            raise self.corrupt("pickle is truncated")
        return data

    def unpack(self, fmt: str, size: int) -> Any:
        return struct.unpack(fmt, self.read(size))[0]

    def skip(self, n: int) -> int:
        """Seek past `n` payload bytes and return where they start."""
        offset = self.stream.tell()
        if n > self.end - offset:
            raise self.corrupt(f"payload of {n} bytes runs past the end of the file")
        self.stream.seek(n, io.SEEK_CUR)
        return offset

    def top(self) -> Any:
        if not self.stack or (self.marks and len(self.stack) == self.marks[-1]):
            raise self.corrupt("pickle stack underflow")
        return self.stack[-1]

    def pop(self) -> Any:
        value = self.top()
        self.stack.pop()
        return value

    def pop_mark(self) -> list[Any]:
        if not self.marks:
            raise self.corrupt("pickle MARK missing")
        start = self.marks.pop()
        items = self.stack[start:]
        del self.stack[start:]
        return items

    def op_proto(self) -> None:
        version = self.read(1)[0]
        if not 2 <= version <= 5:
            raise self.corrupt(f"unsupported pickle protocol {version}")
        self.protocol = version

    def op_frame(self) -> None:
        self.read(8)  # frames only group opcodes that follow inline; nothing to do

    def op_mark(self) -> None:
        self.marks.append(len(self.stack))

    def push_tuple(self, n: int) -> None:
        items = [self.pop() for _ in range(n)]
        self.stack.append(tuple(reversed(items)))

    def push_text(self, length: int) -> None:
        if length > _INLINE_TEXT_LIMIT:
            self.stack.append(FileText(self.skip(length), length))
        else:
            self.stack.append(self.read(length).decode("utf-8", "surrogatepass"))

    def push_span(self, length: int) -> None:
        self.stack.append(FileSpan(self.skip(length), length))

    def push_memo(self, index: int) -> None:
        if index not in self.memo:
            raise self.corrupt(f"pickle memo entry {index} is missing")
        self.stack.append(self.memo[index])

    def op_long1(self) -> None:
        self.stack.append(int.from_bytes(self.read(self.read(1)[0]), "little", signed=True))

    def op_append(self) -> None:
        value = self.pop()
        self.container(list).append(value)

    def op_appends(self) -> None:
        items = self.pop_mark()
        self.container(list).extend(items)

    def op_setitem(self) -> None:
        value = self.pop()
        key = self.pop()
        self.set_items([key, value])

    def op_setitems(self) -> None:
        items = self.pop_mark()
        if len(items) % 2:
            raise self.corrupt("SETITEMS with an odd number of items")
        self.set_items(items)

    def set_items(self, items: list[Any]) -> None:
        target = self.container(dict)
        for key, value in zip(items[::2], items[1::2]):
            # only flat keys: hashing a deeply nested tuple could exhaust the C stack
            if not isinstance(key, _SCALAR_KEY_TYPES):
                raise self.corrupt(f"unsupported dict key of type {type(key).__name__}")
            target[key] = value

    def container(self, kind: type) -> Any:
        target = self.top()
        if not isinstance(target, kind):
            raise self.corrupt(f"expected a {kind.__name__} on the pickle stack, found {type(target).__name__}")
        return target

    def op_global(self) -> None:
        module = self.read_line()
        name = self.read_line()
        self.push_global(module, name)

    def read_line(self) -> str:
        line = self.stream.readline(_GLOBAL_LINE_LIMIT)
        if not line.endswith(b"\n"):
            raise self.corrupt("GLOBAL name is truncated or too long")
        return line[:-1].decode("utf-8")

    def op_stack_global(self) -> None:
        name = self.pop()
        module = self.pop()
        if not isinstance(module, str) or not isinstance(name, str):
            raise self.corrupt("STACK_GLOBAL needs two strings")
        self.push_global(module, name)

    def push_global(self, module: str, name: str) -> None:
        if self.protocol < 3:
            # what pickle.load does with Python 2 names such as `__builtin__.bytes`
            module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        found = Global(module, name)
        if found.qualname not in self.allowed:
            raise UnsafePickle(
                f"refusing pickle global {found.qualname!r} in {self.where}: only array reconstruction is allowed"
            )
        self.stack.append(found)

    def op_reduce(self) -> None:
        args = self.pop()
        func = self.pop()
        if not isinstance(func, Global) or not isinstance(args, tuple):
            raise self.corrupt("REDUCE needs a global and an argument tuple")
        pure_call = _PURE_CALLS.get(func.qualname)
        self.stack.append(pure_call(args) if pure_call else Reduced(func, args))

    def op_build(self) -> None:
        state = self.pop()
        target = self.top()
        if isinstance(target, dict):
            return  # attributes of a mapping (OrderedDict `_metadata`) carry no tensors
        if not isinstance(target, Reduced) or target.built:
            raise self.corrupt("BUILD on something that is not a fresh reconstructed object")
        target.state = state

    def op_binpersid(self) -> None:
        pid = self.pop()
        if self.persistent_load is None:
            raise self.corrupt("persistent id in a pickle that must not have any")
        self.stack.append(self.persistent_load(pid))


class PickleEmitter:
    """Writes pickle opcodes to a stream, in order, without a memo; creating one writes the PROTO header."""

    def __init__(self, stream: BinaryIO, protocol: int) -> None:
        self.stream = stream
        self.protocol = protocol
        stream.write(b"\x80" + bytes([protocol]))

    def value(self, obj: None | bool | int | str | bytes | tuple[Any, ...]) -> None:
        """A plain value: None, bool, int, str, small bytes, or a tuple of those."""
        if obj is None:
            self.stream.write(b"N")
        elif isinstance(obj, bool):
            self.stream.write(b"\x88" if obj else b"\x89")
        elif isinstance(obj, int):
            self.integer(obj)
        elif isinstance(obj, str):
            self.text(obj)
        elif isinstance(obj, bytes) and self.protocol >= 3 and len(obj) < 1 << 8:
            self.stream.write(b"C" + struct.pack("<B", len(obj)) + obj)
        elif isinstance(obj, tuple):
            self.mark()
            self.values(*obj)
            self.tuple_from_mark()
        else:
            raise TypeError(f"PickleEmitter.value cannot write {type(obj).__name__}")

    def values(self, *objs: None | bool | int | str | bytes | tuple[Any, ...]) -> None:
        """Several plain values in turn (the items of an enclosing tuple or call)."""
        for obj in objs:
            self.value(obj)

    def integer(self, n: int) -> None:
        if 0 <= n < 1 << 8:
            self.stream.write(b"K" + struct.pack("<B", n))
        elif 0 <= n < 1 << 16:
            self.stream.write(b"M" + struct.pack("<H", n))
        elif -(1 << 31) <= n < 1 << 31:
            self.stream.write(b"J" + struct.pack("<i", n))
        else:
            encoded = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
            self.stream.write(b"\x8a" + struct.pack("<B", len(encoded)) + encoded)

    def text(self, s: str) -> None:
        encoded = s.encode("utf-8", "surrogatepass")
        if self.protocol >= 4 and len(encoded) < 1 << 8:
            self.stream.write(b"\x8c" + struct.pack("<B", len(encoded)) + encoded)
        elif len(encoded) < 1 << 32:
            self.stream.write(b"X" + struct.pack("<I", len(encoded)) + encoded)
        else:
            self.stream.write(b"\x8d" + struct.pack("<Q", len(encoded)) + encoded)

    def global_ref(self, module: str, name: str) -> None:
        self.stream.write(b"c" + module.encode() + b"\n" + name.encode() + b"\n")

    def mark(self) -> None:
        self.stream.write(b"(")

    def tuple_from_mark(self) -> None:
        self.stream.write(b"t")

    def empty_tuple(self) -> None:
        self.stream.write(b")")

    def empty_dict(self) -> None:
        self.stream.write(b"}")

    def setitem(self) -> None:
        self.stream.write(b"s")

    def reduce(self) -> None:
        self.stream.write(b"R")

    def build(self) -> None:
        self.stream.write(b"b")

    def persistent_id(self) -> None:
        self.stream.write(b"Q")

    def bytes_header(self, nbytes: int) -> None:
        """The opcode and length of a bytes object; the caller writes its `nbytes` of payload next."""
        if self.protocol < 3:
            raise ValueError("bytes opcodes need pickle protocol 3 or later")
        if nbytes < 1 << 32:
            self.stream.write(b"B" + struct.pack("<I", nbytes))
        elif self.protocol >= 4:
            self.stream.write(b"\x8e" + struct.pack("<Q", nbytes))
        else:
            raise ValueError("payloads of 4 GiB or more need pickle protocol 4")

    def stop(self) -> None:
        self.stream.write(b".")


def checked_shape(value: Any, where: str) -> tuple[int, ...]:
    """A shape (or stride/axis list) from a pickle: non-negative ints whose product numpy can index."""
    if (
        not isinstance(value, tuple | list)
        or len(value) > _MAX_DIMS
        or not all(type(dim) is int and 0 <= dim < 1 << 62 for dim in value)
        or math.prod(max(dim, 1) for dim in value) >= 1 << 62
    ):
        raise CorruptCheckpoint(f"{where}: malformed shape")
    return tuple(value)
