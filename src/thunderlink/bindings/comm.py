"""``Comm``: one C communicator, used from Python without copying buffers.

Buffers are numpy arrays or any object with the buffer protocol; they are
lent to the C core for the duration of a call (``ffi.from_buffer``) and never
copied. The GIL is released while the core runs.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from ..errors import ClosedError, InvalidArgumentError, check
from ._core import ffi, lib
from .options import SPECS, Options

__all__ = ["Comm", "Endpoint", "Options", "Topology", "dtype_code", "DTYPES", "REDUCTIONS", "TRANSPORTS"]

# numpy dtype name -> core dtype code. bfloat16 has no numpy dtype: pass
# dtype="bfloat16" with a uint16 array holding the bits (or an ml_dtypes array).
DTYPES = {
    "bool": lib.TL_BOOL,
    "uint8": lib.TL_UINT8,
    "uint16": lib.TL_UINT16,
    "uint32": lib.TL_UINT32,
    "uint64": lib.TL_UINT64,
    "int8": lib.TL_INT8,
    "int16": lib.TL_INT16,
    "int32": lib.TL_INT32,
    "int64": lib.TL_INT64,
    "float16": lib.TL_FLOAT16,
    "float32": lib.TL_FLOAT32,
    "float64": lib.TL_FLOAT64,
    "bfloat16": lib.TL_BFLOAT16,
    "complex64": lib.TL_COMPLEX64,
}

REDUCTIONS = {"sum": lib.TL_SUM, "prod": lib.TL_PROD, "max": lib.TL_MAX, "min": lib.TL_MIN}

# THUNDERLINK_TRANSPORT's values; the ids also index per-transport counters.
# From the options table: the transport option's choices are named in
# TL_TRANSPORT_* order (0 = auto), and those past its maximum are not built.
_TRANSPORT_SPEC = next(s for s in SPECS if s.name == "transport")
TRANSPORTS = {name: code for code, name in enumerate(_TRANSPORT_SPEC.available)}
_TRANSPORT_NAMES = dict(enumerate(_TRANSPORT_SPEC.choices[1:], start=1))


# Looked up by dtype object: dtype.name builds a new string on every call
# (about 2 us with numpy 2), more than the rest of a small collective.
_BY_DTYPE = {np.dtype(name): code for name, code in DTYPES.items() if name != "bfloat16"}


def dtype_code(dtype) -> int:
    """Core dtype code of a numpy dtype (or its name, "bfloat16" included)."""
    code = _BY_DTYPE.get(dtype) if not isinstance(dtype, str) else DTYPES.get(dtype)
    if code is not None:
        return code
    name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    try:
        return DTYPES[name]
    except KeyError:
        raise InvalidArgumentError(
            f"[thunderlink] unsupported dtype {name!r}: thunderlink supports "
            f"{', '.join(DTYPES)}"
        ) from None


@dataclass(frozen=True)
class Endpoint:
    """Rank ``owner`` listens on host:port. ``facing`` is the rank meant to
    connect there (the far end of a cable), or -1 for any rank."""

    owner: int
    host: str
    port: int
    facing: int = -1
    ifname: str = ""
    weight: float = 1.0
    device: str = ""  # RDMA device of this end ("" = rdma_<ifname>, else the first active)


def _choice(table: dict, value: str, name: str) -> int:
    code = table.get(value)
    if code is not None:
        return code
    try:
        return table[str(value).lower()]
    except KeyError:
        raise InvalidArgumentError(
            f"[thunderlink] {name} must be one of {', '.join(table)}, not {value!r}"
        ) from None


_ITEMSIZE = {code: int(lib.tl_dtype_size(code)) for code in DTYPES.values()}


def _view(obj, dtype, writable: bool, what: str):
    """(cdata, element count, dtype code, array) of a buffer, without copying.
    On the path of every call: keep it cheap."""
    if type(obj) is np.ndarray or isinstance(obj, np.ndarray):
        arr = obj
    else:
        try:
            arr = np.asarray(memoryview(obj))
        except TypeError:
            raise InvalidArgumentError(
                f"[thunderlink] {what}: expected a numpy array or a buffer, got {type(obj).__name__}"
            ) from None
    flags = arr.flags
    if not flags.c_contiguous:
        raise InvalidArgumentError(
            f"[thunderlink] {what}: the array must be C-contiguous (use numpy.ascontiguousarray)"
        )
    if writable and not flags.writeable:
        raise InvalidArgumentError(f"[thunderlink] {what}: the output array is read-only")
    if dtype is None:
        code = _BY_DTYPE.get(arr.dtype)
        if code is None:
            code = dtype_code(arr.dtype)
        count = arr.nbytes // _ITEMSIZE[code]
    else:
        code = dtype_code(dtype)
        size = _ITEMSIZE[code]
        if arr.nbytes % size:
            raise InvalidArgumentError(
                f"[thunderlink] {what}: {arr.nbytes} bytes is not a whole number of {dtype} elements"
            )
        count = arr.nbytes // size
    if not arr.nbytes:
        return ffi.NULL, 0, code, arr
    return ffi.from_buffer(arr, require_writable=writable), count, code, arr


class Comm:
    """A connected communicator; create one with :meth:`Comm.create`.

    Calls on one Comm from several threads are serialised by the core;
    distinct communicators (e.g. from :meth:`split`) run concurrently.
    :meth:`close` may come from any thread: a call in flight on another
    thread then fails at once with :class:`ClosedError`, and the core frees
    the communicator only once the last such call has returned."""

    def __init__(self, handle):
        self._h = handle
        self._lock = threading.Lock()
        self._busy = 0        # calls in flight (between _begin and _end)
        self._orphan = None   # closed while busy: the last call releases it
        self._registered = {}  # (address, bytes) -> buffers kept alive by register_memory
        self._rank = int(lib.tl_comm_rank(handle))
        self._size = int(lib.tl_comm_size(handle))

    def _begin(self):
        """The handle, held for one call: close() cannot free it until the
        matching _end."""
        with self._lock:
            h = self._h
            if h is None:
                raise ClosedError("[thunderlink] the communicator is closed")
            self._busy += 1
        return h

    def _end(self) -> None:
        with self._lock:
            self._busy -= 1
            if self._busy or self._orphan is None:
                return
            h, self._orphan = self._orphan, None
        lib.tl_comm_release(h)

    # ---- life cycle -------------------------------------------------------

    @classmethod
    def create(
        cls,
        rank: int,
        size: int,
        endpoints: Iterable[Endpoint],
        options: Options | None = None,
        ring: Sequence[int] | None = None,
    ) -> "Comm":
        """Create and connect rank ``rank`` of ``size``. Blocks until every
        connection of this rank is up, or the connect timeout."""
        if not (0 <= rank < size):
            raise InvalidArgumentError(f"[thunderlink] rank {rank} is out of range for world size {size}")
        opts = (options or Options()).to_c()
        out = ffi.new("tl_comm_t **")
        rc = lib.tl_comm_create(out, rank, size, opts)
        if rc:
            check(rc)
        comm = cls(out[0])
        try:
            for e in endpoints:
                check(
                    lib.tl_comm_add_endpoint(
                        comm._h, e.owner, e.facing, e.host.encode(), e.port,
                        e.ifname.encode() if e.ifname else ffi.NULL,
                        e.device.encode() if e.device else ffi.NULL, float(e.weight),
                    ),
                    comm._h,
                )
            if ring is not None:
                order = ffi.new("int32_t[]", list(ring))
                check(lib.tl_comm_set_ring(comm._h, order, len(ring)), comm._h)
            check(lib.tl_comm_connect(comm._h), comm._h)
        except BaseException:
            comm.close()
            raise
        return comm

    def close(self) -> None:
        """Close the connections and free the communicator (idempotent).
        From another thread, it makes a call in flight on this Comm fail
        with ClosedError (it waits the few milliseconds that call takes to
        notice); the memory is freed after that call has returned. An MLX
        group made from this Comm keeps its connections unless a call was
        in flight."""
        with self._lock:
            h, self._h = self._h, None
            busy = self._busy
        if h is None:
            return
        if busy:
            lib.tl_comm_close(h)  # wakes the calls in flight: they fail, closed
        with self._lock:
            if self._busy:
                self._orphan, h = h, None  # the last call to end releases it
        if h is not None:
            lib.tl_comm_release(h)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    @property
    def handle(self):
        if self._h is None:
            raise ClosedError("[thunderlink] the communicator is closed")
        return self._h

    def handle_address(self) -> int:
        """A new reference to the communicator, as an integer, for the MLX
        shim (which releases it)."""
        h = self._begin()
        try:
            lib.tl_comm_retain(h)
            return int(ffi.cast("uintptr_t", h))
        finally:
            self._end()

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def size(self) -> int:
        return self._size

    def __repr__(self):
        if self._h is None:
            return "<thunderlink.Comm closed>"
        return f"<thunderlink.Comm rank {self.rank} of {self.size}>"

    # ---- collectives ------------------------------------------------------

    def all_reduce(self, x, out=None, op: str = "sum", dtype=None):
        """out = op over ranks of x (in place when out is x). Returns out."""
        src, n, code, arr = _view(x, dtype, False, "all_reduce input")
        if out is None:
            out = np.empty_like(arr)
        dst, m, code2, _ = _view(out, dtype, True, "all_reduce output")
        if (m, code2) != (n, code):
            raise InvalidArgumentError("[thunderlink] all_reduce: output must match the input's size and dtype")
        redop = _choice(REDUCTIONS, op, "op")
        h = self._begin()
        try:
            check(lib.tl_all_reduce(h, src, dst, n, code, redop), h)
        finally:
            self._end()
        return out

    def all_sum(self, x, out=None, dtype=None):
        return self.all_reduce(x, out, "sum", dtype)

    def all_max(self, x, out=None, dtype=None):
        return self.all_reduce(x, out, "max", dtype)

    def all_min(self, x, out=None, dtype=None):
        return self.all_reduce(x, out, "min", dtype)

    def all_gather(self, x, out=None, dtype=None):
        """out = concatenation over ranks of x along the first axis."""
        src, n, code, arr = _view(x, dtype, False, "all_gather input")
        size = self._size
        if out is None:
            shape = (arr.shape[0] * size,) + arr.shape[1:] if arr.ndim else (size,)
            out = np.empty(shape, dtype=arr.dtype)
        dst, m, code2, _ = _view(out, dtype, True, "all_gather output")
        if (m, code2) != (n * size, code):
            raise InvalidArgumentError(
                f"[thunderlink] all_gather: output must hold {size} x {n} elements of the input's dtype"
            )
        h = self._begin()
        try:
            check(lib.tl_all_gather(h, src, dst, n, code), h)
        finally:
            self._end()
        return out

    def reduce_scatter(self, x, out=None, op: str = "sum", dtype=None):
        """Rank r gets op over ranks of block r of x (x's first axis is cut
        into size blocks; it must be divisible by size)."""
        src, n, code, arr = _view(x, dtype, False, "reduce_scatter input")
        size = self._size
        if n % size:
            raise InvalidArgumentError(
                f"[thunderlink] reduce_scatter: {n} elements cannot be cut into {size} equal blocks"
            )
        if out is None:
            if arr.ndim and arr.shape[0] % size == 0:
                out = np.empty((arr.shape[0] // size,) + arr.shape[1:], dtype=arr.dtype)
            else:
                out = np.empty(n // size, dtype=arr.dtype)
        dst, m, code2, _ = _view(out, dtype, True, "reduce_scatter output")
        if (m, code2) != (n // size, code):
            raise InvalidArgumentError("[thunderlink] reduce_scatter: output must hold one block of the input")
        redop = _choice(REDUCTIONS, op, "op")
        h = self._begin()
        try:
            check(lib.tl_reduce_scatter(h, src, dst, n // size, code, redop), h)
        finally:
            self._end()
        return out

    def send(self, x, peer: int, dtype=None) -> None:
        src, n, code, _ = _view(x, dtype, False, "send")
        h = self._begin()
        try:
            check(lib.tl_send(h, src, n, code, peer), h)
        finally:
            self._end()

    def recv(self, out, peer: int, dtype=None):
        dst, n, code, _ = _view(out, dtype, True, "recv")
        h = self._begin()
        try:
            check(lib.tl_recv(h, dst, n, code, peer), h)
        finally:
            self._end()
        return out

    def broadcast(self, x, root: int = 0, dtype=None):
        """Copy x of ``root`` into x of every rank (in place). Returns x."""
        buf, n, code, _ = _view(x, dtype, True, "broadcast")
        h = self._begin()
        try:
            check(lib.tl_broadcast(h, buf, n, code, root), h)
        finally:
            self._end()
        return x

    def barrier(self) -> None:
        h = self._begin()
        try:
            check(lib.tl_barrier(h), h)
        finally:
            self._end()

    def split(self, color: int, key: int = -1) -> "Comm | None":
        """Collective: ranks with the same color form a new communicator,
        ordered by key. A negative color returns None."""
        out = ffi.new("tl_comm_t **")
        h = self._begin()
        try:
            check(lib.tl_comm_split(h, color, key, out), h)
        finally:
            self._end()
        return Comm(out[0]) if out[0] != ffi.NULL else None

    def stats(self) -> dict:
        """Counters: calls per operation, payload bytes sent and received
        (in all and per transport: ``bytes_sent_by["shm"]`` ...)."""
        h = self._begin()
        try:
            return _stats(h)
        finally:
            self._end()

    def register_memory(self, buffer) -> None:
        """Declare ``buffer`` (anything with the buffer protocol: a numpy or
        MLX array) stable: RDMA links register it once and keep it
        registered, so zero copy from and into it costs no registration in
        later calls (NCCL's ncclCommRegister). The Comm keeps a reference to
        it until :meth:`deregister_memory`; do not resize or free its memory
        meanwhile. Without this, registrations last one call. A no-op on
        links other than RDMA."""
        view = ffi.from_buffer(buffer)
        if not len(view):
            raise InvalidArgumentError("[thunderlink] register_memory: the buffer is empty")
        h = self._begin()
        try:
            check(lib.tl_comm_register_memory(h, view, len(view)), h)
            self._registered.setdefault((int(ffi.cast("uintptr_t", view)), len(view)), []).append(buffer)
        finally:
            self._end()

    def deregister_memory(self, buffer) -> None:
        """Undo one :meth:`register_memory` of the same buffer."""
        view = ffi.from_buffer(buffer)
        key = (int(ffi.cast("uintptr_t", view)), len(view))
        h = self._begin()
        try:
            check(lib.tl_comm_deregister_memory(h, view, len(view)), h)
            held = self._registered.get(key)
            if held:
                held.pop()
                if not held:
                    del self._registered[key]
        finally:
            self._end()

    def links(self) -> dict[int, tuple[str, int]]:
        """Every peer this rank shares a link with -> (its transport, its
        number of channels: TCP connections, or shared-memory rings)."""
        kind, nch = ffi.new("int *"), ffi.new("int *")
        out = {}
        h = self._begin()
        try:
            for peer in range(self._size):
                check(lib.tl_comm_link_info(h, peer, kind, nch), h)
                if nch[0]:
                    out[peer] = (_TRANSPORT_NAMES[kind[0]], nch[0])
        finally:
            self._end()
        return out


OP_NAMES = {
    "all_reduce": lib.TL_OP_ALL_REDUCE,
    "all_gather": lib.TL_OP_ALL_GATHER,
    "reduce_scatter": lib.TL_OP_REDUCE_SCATTER,
    "send": lib.TL_OP_SEND,
    "broadcast": lib.TL_OP_BROADCAST,
    "barrier": lib.TL_OP_BARRIER,
    "split": lib.TL_OP_SPLIT,
}


def _stats(handle) -> dict:
    s = ffi.new("tl_stats_t *")
    check(lib.tl_comm_stats(handle, s), handle)
    return {
        "calls": {name: int(s.calls[code]) for name, code in OP_NAMES.items()},
        "bytes_sent": int(s.bytes_sent),
        "bytes_received": int(s.bytes_received),
        "last_in": int(s.last_in),
        "last_out": int(s.last_out),
        "bytes_sent_by": {name: int(s.bytes_sent_by[code]) for code, name in _TRANSPORT_NAMES.items()},
        "bytes_received_by": {name: int(s.bytes_received_by[code]) for code, name in _TRANSPORT_NAMES.items()},
        # RDMA zero copy and its registration cache (see the README's RDMA section).
        "rdma": {k: int(getattr(s, k)) for k in (
            "zcopy_sent", "zcopy_sent_bytes", "zcopy_received", "zcopy_received_bytes",
            "mr_registered", "mr_hits", "mr_evicted", "zcopy_staged")},
    }


def configure_rdma(library: str | None = None, device: str | None = None, *, env: bool = True) -> None:
    """Tell the core which ibverbs library and device the RDMA transport uses:
    the arguments, else (with ``env``) THUNDERLINK_IBV_LIB / THUNDERLINK_IBV_DEVICE,
    else the system's library and the device chosen per link."""
    if env:
        from ..config import rdma_settings  # config imports bindings: not at import time

        env_lib, env_dev = rdma_settings()
        library, device = library or env_lib, device or env_dev
    check(lib.tl_rdma_configure(library.encode() if library else ffi.NULL,
                                device.encode() if device else ffi.NULL))


def rdma_devices() -> tuple[list[dict], str]:
    """The RDMA ports this process sees (device, port, state, link_layer,
    mtu, lid, gid_index, gid), and why there are none ("" when there are)."""
    configure_rdma()
    buf = ffi.new("char[65536]")
    check(lib.tl_rdma_describe(buf, len(buf)))
    ports, why = [], ""
    for line in ffi.string(buf).decode(errors="replace").splitlines():
        f = line.split("\t")
        if f[0] == "unavailable":
            why = f[1] if len(f) > 1 else "unavailable"
        elif len(f) >= 4 and f[2] == "error":
            ports.append({"device": f[0], "port": f[1], "state": "error", "error": f[3]})
        elif len(f) >= 8:
            ports.append({"device": f[0], "port": int(f[1]), "state": f[2], "link_layer": f[3],
                          "mtu": int(f[4]), "lid": int(f[5]), "gid_index": int(f[6]), "gid": f[7]})
    return ports, why


def transport_available(name: str) -> tuple[bool, str]:
    """(whether this process can use transport ``name``, why not)."""
    configure_rdma()
    why = ffi.new("char[512]")
    code = _choice(TRANSPORTS, name, "transport")
    return lib.tl_transport_available(code, why, len(why)) == 0, ffi.string(why).decode()


class Topology:
    """The core's view of a set of endpoints, without connecting: which
    ranks share a link, over which cables, and the ring order. The core
    computes the same when it connects, so tools that ask here (hostfile
    checks, ``thunderlink doctor``) agree with it."""

    def __init__(self, size: int, endpoints: Iterable[Endpoint]):
        out = ffi.new("tl_comm_t **")
        check(lib.tl_comm_create(out, 0, size, ffi.NULL))
        self._h = ffi.gc(out[0], lib.tl_comm_release)
        self.size = size
        self.endpoints = list(endpoints)
        for e in self.endpoints:
            check(
                lib.tl_comm_add_endpoint(
                    self._h, e.owner, e.facing, e.host.encode(), e.port,
                    e.ifname.encode() if e.ifname else ffi.NULL,
                    e.device.encode() if e.device else ffi.NULL, float(e.weight),
                ),
                self._h,
            )

    def link(self, a: int, b: int) -> tuple[int | None, list[int], list[int | None]]:
        """(the rank that listens for the link between a and b, indices in
        ``endpoints`` of its addresses the other rank dials, one per cable,
        and for each cable the index of the dialling rank's own address it
        leaves from, or None where its routes decide); (None, [], []) when
        the two share no link."""
        acceptor, n = ffi.new("int *"), ffi.new("int *")
        cables, sources = ffi.new("int32_t[64]"), ffi.new("int32_t[64]")
        check(lib.tl_comm_link_plan(self._h, a, b, acceptor, cables, sources, 64, n), self._h)
        if acceptor[0] < 0:
            return None, [], []
        k = min(n[0], 64)
        return (acceptor[0], [int(cables[i]) for i in range(k)],
                [int(sources[i]) if sources[i] >= 0 else None for i in range(k)])

    def linked(self, a: int, b: int) -> bool:
        return self.link(a, b)[0] is not None

    def ring(self) -> list[int]:
        """A ring order whose neighbours share links (raises ConfigError,
        saying why, when there is none or the bounded search gives up)."""
        order = ffi.new("int32_t[]", self.size)
        check(lib.tl_comm_find_ring(self._h, order, self.size), self._h)
        return list(order)


def process_stats() -> dict:
    """Counters summed over every communicator of this process."""
    return _stats(ffi.NULL)
