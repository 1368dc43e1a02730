"""The NFQUEUE adapter: packets from the kernel -> the engine -> a verdict back to the kernel.

A thin loop around a sans-I/O engine (``bits/engine.py``)::

    out = engine.process_outbound(payload, now)    # or process_inbound for inbound queues
    out is payload      -> accept unchanged   (BYPASS)
    out is new bytes    -> set_payload + accept (ESP encapsulated / decapsulated)
    out is a Drop       -> drop
    the engine raised   -> drop (fail closed), counted and traced as "error"

Processes. ``workers = 1``: one process binds every queue. ``workers = 2``: one process for the
outbound queues and one for the inbound queues, under a small supervisor that owns the public
control socket and forwards requests and signals. Splitting by direction means no SA's sequence
counter or replay window is ever shared between processes: an outbound SA lives only in the
outbound worker, an inbound SA only in the inbound one.

Signals. SIGTERM/SIGINT stop cleanly (queues unbound, trace flushed, control socket removed,
``engine.close()``); SIGHUP calls the reload hook. Handlers only set flags; ``signal.set_wakeup_fd``
wakes the loop. The loop also runs its housekeeping (signals, control socket, engine timers, trace
flush) every ``HOUSEKEEPING_EVERY`` packets from inside the packet callback, because under a flood
``NetfilterQueue.run(block=False)`` only returns once the socket is empty.

Fail closed everywhere: no ``--queue-bypass`` in the rules (no processor: the kernel drops), no
fail-open flag on the queues (queue full: the kernel drops), an engine exception drops the packet.

Verdicts are batched. The ``netfilterqueue`` binding receives and parses the packets (C), but its
``accept()`` costs one ``sendmsg`` per packet. The callback instead appends each verdict (with the
new payload, if any) to a ``VerdictBatch`` that sends up to ``VERDICT_BATCH`` verdict messages in
one ``sendmsg`` on the queue's own netlink socket (the kernel takes a verdict only from the socket
that bound the queue), when the batch is full and whenever the socket has no packet left, before
the loop sleeps. Under load that saves a system call and a kernel buffer per packet; a lone packet
is still answered at once. docs/performance.md has the measurements.

Limits of the ``netfilterqueue`` binding: packets are copied to user space up to 4016 octets
(larger ones arrive truncated; the engine's IP length checks drop them as malformed unless they
pass unchanged, in which case the kernel sends its intact copy).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import select
import selectors
import signal
import socket
import struct
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

from ..constants import Direction
from ..errors import BitsError
from ..trace import TraceEventName, Tracer
from .control import ControlError, ControlServer, control_request, make_engine_handler
from .tracefile import TraceSettings, TraceWriter, open_trace_writer

LOG = logging.getLogger("mipbits.nfqueue")

HOUSEKEEPING_EVERY = 256  # packets between housekeeping runs inside the callback
MAX_TIMER_WAIT = 1.0  # seconds the loop sleeps at most
TIMER_RECHECK = 0.5  # seconds between next_timer() calls when no deadline is nearer
DEFAULT_MAXLEN = 4096  # kernel queue length (packets) per queue
#: Netlink socket receive buffer per queued packet: the binding's own sizing (4016 octets copied +
#: 780 of overhead, doubled by the kernel) for every packet the kernel queue may hold, so that a
#: backlog is dropped by the queue's length limit (counted as queue_dropped), not at random when
#: the socket fills (ENOBUFS, user_dropped), and a scheduling hiccup costs no packets.
SOCKET_BYTES_PER_PACKET = (4016 + 780) // 2
VERDICT_BATCH = 16  # verdict messages per sendmsg at most (16 x 4 kB stays far below the socket's send buffer)
ACCEPTED, MODIFIED, DROPPED, ERRORS = range(4)
_COUNTER_NAMES = ("accepted", "modified", "dropped", "errors")


class ProcessorError(BitsError):
    """The processor cannot start (queue already bound, not root, bad settings)."""


@dataclass(frozen=True, slots=True)
class QueueSettings:
    """The ``[queues]`` section: queue numbers per direction and the number of processes."""

    outbound: tuple[int, ...] = (0,)
    inbound: tuple[int, ...] = (1,)
    workers: int = 1  # 1: one process; 2: one outbound + one inbound process
    maxlen: int = DEFAULT_MAXLEN


class Engine(Protocol):
    """What the adapter needs from ``bits.engine.Engine`` (timers and close are optional)."""

    def process_outbound(self, packet: bytes, now: float) -> Any: ...

    def process_inbound(self, packet: bytes, now: float) -> Any: ...

    def status(self) -> Mapping[str, Any]: ...


class ProcessorConfig(Protocol):
    """What ``run_processor`` needs from a node configuration (``mipbits.nodeconfig.NodeConfig``)."""

    queues: QueueSettings
    trace: TraceSettings
    control_socket: str


#: ``engine_factory(tracer, direction)``: direction None means "both directions in this process".
EngineFactory = Callable[[Tracer, Direction | None], Engine]
#: ``on_reload(engine)`` on SIGHUP: reload in place (return None) or return a replacement engine.
ReloadHook = Callable[[Engine], Engine | None]


# -- verdicts ------------------------------------------------------------------------------------

# nfnetlink_queue verdict message (linux/netfilter/nfnetlink_queue.h): nlmsghdr (host order) |
# nfgenmsg (AF_UNSPEC, NFNETLINK_V0, queue number big-endian) | NFQA_VERDICT_HDR {verdict, packet
# id} (big-endian) | optional NFQA_PAYLOAD with the new packet. No NLM_F_ACK: the kernel answers only
# a verdict it cannot apply (an NLMSG_ERROR the binding reads and ignores, as libnetfilter_queue does).
NF_DROP, NF_ACCEPT = 0, 1
_NFQNL_MSG_VERDICT = (3 << 8) | 1  # NFNL_SUBSYS_QUEUE << 8 | NFQNL_MSG_VERDICT
_NLM_F_REQUEST = 0x1
_NFQA_VERDICT_HDR, _NFQA_PAYLOAD = 2, 10
_VERDICT_LEN = 32  # nlmsghdr 16 + nfgenmsg 4 + NFQA_VERDICT_HDR 12
_pack_verdict = struct.Struct("=I24sI").pack  # nlmsg_len, octets 4-27 (constant per queue and verdict), id
_pack_verdict_payload = struct.Struct("=I24sIHH").pack  # ... then the NFQA_PAYLOAD attribute header
_htonl = socket.htonl
_PADS = (b"", b"\0\0\0", b"\0\0", b"\0")  # after a payload of length % 4 == 1, 2, 3
_MAX_PAYLOAD = 0xFFFF - 4  # NFQA_PAYLOAD's 16-bit attribute length


def verdict_middle(queue: int, verdict: int) -> bytes:
    """Octets 4-27 of a verdict message: everything up to the packet id but the length."""
    return (struct.pack("=HHII", _NFQNL_MSG_VERDICT, _NLM_F_REQUEST, 0, 0)  # type, flags, seq, portid
            + struct.pack("!BBH", socket.AF_UNSPEC, 0, queue)  # nfgenmsg
            + struct.pack("=HH", 12, _NFQA_VERDICT_HDR) + struct.pack("!I", verdict))


class VerdictBatch:
    """The verdicts of one queue, sent several per ``sendmsg`` (see the module docstring).

    ``add(pkt, verdict, payload)`` queues the verdict for ``pkt`` (anything with the kernel's
    packet ``id``), with ``payload`` (bytes) replacing the packet or None; ``flush()`` sends what
    is queued. ``send`` is the queue socket's ``sendmsg``. A failed send is retried one message at
    a time; a verdict that cannot be sent leaves its packet to the kernel, which drops it when the
    queue goes away (fail closed). Never raises.
    """

    __slots__ = ("_send", "_pending", "_count", "limit", "_accept", "_drop", "sends", "send_errors", "_log_at")

    def __init__(self, send: Callable[[list[bytes]], int], queue: int, limit: int = VERDICT_BATCH) -> None:
        self._send = send
        self._pending: list[bytes] = []
        self._count = 0
        self.limit = max(1, limit)
        self._accept = verdict_middle(queue, NF_ACCEPT)
        self._drop = verdict_middle(queue, NF_DROP)
        self.sends = 0  # sendmsg calls
        self.send_errors = 0  # verdict messages the kernel did not take
        self._log_at = 0.0

    def add(self, pkt: Any, verdict: int, payload: bytes | None = None) -> None:
        """Queue one verdict. ``payload`` must be bytes; a payload too large for a netlink
        attribute raises ValueError before anything is queued (the caller then drops)."""
        pending = self._pending
        if payload is None:
            pending.append(_pack_verdict(_VERDICT_LEN, self._accept if verdict else self._drop, _htonl(pkt.id)))
        else:
            n = len(payload)
            if n > _MAX_PAYLOAD:
                raise ValueError(f"payload of {n} octets does not fit a netlink attribute")
            middle = self._accept if verdict else self._drop
            pending.append(_pack_verdict_payload(_VERDICT_LEN + 4 + n, middle, _htonl(pkt.id), 4 + n, _NFQA_PAYLOAD))
            pending.append(payload)
            if n & 3:
                pending.append(_PADS[n & 3])
        self._count += 1
        if self._count >= self.limit:
            self.flush()

    def flush(self) -> None:
        if not self._count:
            return
        buffers, self._pending, self._count = self._pending, [], 0
        self.sends += 1
        try:
            self._send(buffers)
        except OSError as exc:
            self._send_one_by_one(b"".join(buffers), exc)

    def _send_one_by_one(self, data: bytes, first: OSError) -> None:
        failed = 0
        for message in split_messages(data):
            try:
                self._send([message])
            except OSError:
                failed += 1
        self.send_errors += failed
        now = time.monotonic()
        if failed and now - self._log_at >= 1.0:
            self._log_at = now
            LOG.error("NFQUEUE verdicts not sent (%s); %d packet(s) left to the kernel", first, failed)


def split_messages(data: bytes) -> list[bytes]:
    """The netlink messages in ``data`` (each ``nlmsg_len`` long, starting 4-octet aligned)."""
    out, off = [], 0
    while off + 16 <= len(data):
        (length,) = struct.unpack_from("=I", data, off)
        if length < 16:
            break
        out.append(data[off:off + length])
        off += (length + 3) & ~3
    return out


def _verdict_direct(pkt: Any, verdict: int, payload: bytes | None = None) -> None:
    """One verdict, now, through the binding's own methods (one ``sendmsg``; tests, fallback)."""
    if payload is not None:
        pkt.set_payload(payload)
    if verdict == NF_ACCEPT:
        pkt.accept()
    else:
        pkt.drop()


# -- the per-packet callback ---------------------------------------------------------------------


def make_callback(
    process: Callable[[bytes, float], Any],
    counts: list[int],
    tracer: Tracer,
    queue: int,
    on_error: Callable[[BaseException, int], None],
    housekeeping: Callable[[], None] = lambda: None,
    clock: Callable[[], float] = time.monotonic,
    verdict: Callable[[Any, int, bytes | None], None] = _verdict_direct,
) -> tuple[Callable[[Any], None], Callable[[Callable[[bytes, float], Any]], None]]:
    """The NFQUEUE callback for one queue, and a setter that swaps ``process`` (reload).

    ``verdict(pkt, NF_ACCEPT | NF_DROP, payload or None)`` gives the verdict: at once through
    the packet's methods (default) or queued in a ``VerdictBatch`` (``VerdictBatch.add``).
    Hot path: one payload copy, one clock read, one engine call, one verdict, one counter.
    """
    budget = HOUSEKEEPING_EVERY

    def callback(pkt: Any) -> None:
        nonlocal budget
        try:
            payload = pkt.get_payload()
            if tracer.wants_drops:
                tracer.queue = queue
            out = process(payload, clock())
            if out is payload:
                verdict(pkt, NF_ACCEPT, None)
                counts[ACCEPTED] += 1
            elif out:  # new bytes; a Drop is falsy, and so is b"" (never accept an empty packet)
                verdict(pkt, NF_ACCEPT, out if type(out) is bytes else bytes(out))
                counts[MODIFIED] += 1
            else:
                verdict(pkt, NF_DROP, None)
                counts[DROPPED] += 1
        except Exception as exc:  # noqa: BLE001 - a bug must cost one packet, not the processor
            with contextlib.suppress(Exception):  # the verdict may already be set
                verdict(pkt, NF_DROP, None)
            counts[ERRORS] += 1
            on_error(exc, queue)
        budget -= 1
        if budget <= 0:
            budget = HOUSEKEEPING_EVERY
            housekeeping()

    def set_process(fn: Callable[[bytes, float], Any]) -> None:
        nonlocal process
        process = fn

    return callback, set_process


def _drain(run: Callable[..., None], flush: Callable[[], None]) -> None:
    """The queue socket is readable: take every waiting packet, then send the verdicts still queued."""
    try:
        run(block=False)
    finally:
        flush()


# -- one process ---------------------------------------------------------------------------------


class Processor:
    """Binds queues, runs the loop, serves the control socket for one engine."""

    def __init__(
        self,
        engine: Engine,
        bindings: Sequence[tuple[int, Direction]],
        tracer: Tracer,
        *,
        trace_writer: TraceWriter | None = None,
        control_path: str | None = None,
        maxlen: int = DEFAULT_MAXLEN,
        on_reload: ReloadHook | None = None,
        role: str = "both",
        verdict_batch: int = VERDICT_BATCH,
    ) -> None:
        self.engine = engine
        self.verdict_batch = verdict_batch
        self.bindings = list(bindings)
        self.tracer = tracer
        self.trace_writer = trace_writer
        self.control_path = control_path
        self.maxlen = maxlen
        self.on_reload = on_reload
        self.role = role
        self.counts = {q: [0, 0, 0, 0] for q, _ in self.bindings}
        self.reloads = 0
        self._started = time.monotonic()
        self._stop = False
        self._reload = False
        self._queues: list[tuple[Any, VerdictBatch, socket.socket]] = []  # (NetfilterQueue, batch, socket)
        self._batches: dict[int, VerdictBatch] = {}  # queue -> its verdicts (kept for the status)
        self._setters: list[tuple[Direction, Callable[[Callable[[bytes, float], Any]], None]]] = []
        self._control: ControlServer | None = None
        self._epoll = select.epoll()
        self._on_ready: dict[int, Callable[[], None]] = {}  # fd -> what to do when readable
        self._control_ready = False
        self._timer_due = 0.0  # when to ask the engine's next_timer() again
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._errors_logged = 0.0

    # -- life cycle ------------------------------------------------------------------------------

    def bind(self) -> None:
        """Bind every queue; ProcessorError names the queue that failed."""
        try:
            from netfilterqueue import NetfilterQueue
        except ImportError as exc:
            raise ProcessorError(f"the netfilterqueue package is missing: {exc}") from None
        for queue, direction in self.bindings:
            nfq = NetfilterQueue()
            # the verdicts leave on the queue's own socket (same netlink port id), several at a time
            sock = socket.socket(fileno=os.dup(nfq.get_fd()))
            batch = VerdictBatch(sock.sendmsg, queue, self.verdict_batch)
            cb, setter = make_callback(
                self._process_fn(direction), self.counts[queue], self.tracer, queue, self._on_error,
                self._housekeeping, verdict=batch.add,
            )
            try:
                nfq.bind(queue, cb, max_len=self.maxlen, sock_len=self.maxlen * SOCKET_BYTES_PER_PACKET)
            except OSError as exc:
                sock.close()
                raise ProcessorError(
                    f"cannot bind NFQUEUE {queue} ({exc}): another process holds it, or we are not root"
                ) from None
            self._queues.append((nfq, batch, sock))
            self._batches[queue] = batch
            self._setters.append((direction, setter))
            self._watch(nfq.get_fd(), partial(_drain, nfq.run, batch.flush))
        self._watch(self._wake_r.fileno(), self._drain_wakeups)
        if self.control_path:
            handler = make_engine_handler(lambda: self.engine, self.processor_status)
            self._control = ControlServer(self.control_path, handler)
            self._watch(self._control.fileno(), self._mark_control_ready)
        self._trace(TraceEventName.START, detail=f"pid {os.getpid()} queues {self._queue_text()}")
        LOG.info("bound NFQUEUE %s (pid %d)", self._queue_text(), os.getpid())

    def serve(self) -> None:
        """Run until ``request_stop``: wait, drain the ready queues, housekeeping, repeat."""
        poll = self._epoll.poll
        on_ready = self._on_ready
        while not self._stop:
            timeout = min(MAX_TIMER_WAIT, max(0.0, self._timer_due - time.monotonic()))
            for fd, _ in poll(timeout):
                action = on_ready.get(fd)
                if action is not None:
                    action()
            self._housekeeping(control=self._control_ready)

    def _watch(self, fd: int, action: Callable[[], None]) -> None:
        self._on_ready[fd] = action
        self._epoll.register(fd, select.EPOLLIN)

    def _unwatch(self, fd: int) -> None:
        if self._on_ready.pop(fd, None) is not None:
            with contextlib.suppress(OSError, ValueError):
                self._epoll.unregister(fd)

    def _drain_wakeups(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_r.recv(4096)

    def _mark_control_ready(self) -> None:
        self._control_ready = True

    def close(self) -> None:
        """Unbind, stop the control socket, trace the stop, close the engine and the trace."""
        self._unbind_all()
        if self._control is not None:
            self._control.close()
            self._control = None
        self._trace(TraceEventName.STOP, detail=f"pid {os.getpid()}")
        close = getattr(self.engine, "close", None)
        if callable(close):
            try:
                close()
            except Exception:  # noqa: BLE001
                LOG.exception("engine.close() failed")
        if self.trace_writer is not None:
            self.trace_writer.close()
        self._epoll.close()
        self._wake_r.close()
        self._wake_w.close()

    def request_stop(self) -> None:
        self._stop = True
        self._wake()

    def request_reload(self) -> None:
        self._reload = True
        self._wake()

    def wakeup_fd(self) -> int:
        return self._wake_w.fileno()

    # -- loop helpers ----------------------------------------------------------------------------

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    def _housekeeping(self, control: bool = True) -> None:
        """Signals, control requests, engine timers, trace flush. Also run from the packet
        callback every HOUSEKEEPING_EVERY packets (``control`` True: poll the socket anyway)."""
        if self._stop:
            self._unbind_all()  # under a flood this is what makes run(block=False) return
            return
        if self._reload:
            self._reload = False
            self._do_reload()
        if control and self._control is not None:
            self._control_ready = False
            self._control.service(0)
        now = time.monotonic()
        if now >= self._timer_due:
            self._timers(now)
        if self.trace_writer is not None:
            self.trace_writer.flush()

    def _timers(self, now: float) -> None:
        """Run due engine timers; ask ``next_timer()`` again at the deadline or in TIMER_RECHECK
        seconds, whichever is first (traffic may move a deadline; asking per packet costs)."""
        next_timer = getattr(self.engine, "next_timer", None)
        handle = getattr(self.engine, "handle_timer", None)
        deadline = next_timer() if callable(next_timer) else None
        if deadline is not None and deadline <= now and callable(handle):
            handle(now)
            deadline = next_timer()  # type: ignore[misc]
        self._timer_due = now + TIMER_RECHECK if deadline is None else min(deadline, now + TIMER_RECHECK)

    def _unbind_all(self) -> None:
        while self._queues:
            nfq, batch, sock = self._queues.pop()
            batch.flush()
            self._unwatch(nfq.get_fd())
            nfq.unbind()
            sock.close()

    def _process_fn(self, direction: Direction) -> Callable[[bytes, float], Any]:
        if direction == Direction.OUT:
            return self.engine.process_outbound
        return self.engine.process_inbound

    def _do_reload(self) -> None:
        LOG.info("reloading (SIGHUP)")
        try:
            replacement = self.on_reload(self.engine) if self.on_reload else _default_reload(self.engine)
        except Exception as exc:  # noqa: BLE001 - a bad new config must not stop protection
            LOG.error("reload failed, keeping the running configuration: %s", exc)
            self._trace(TraceEventName.ERROR, detail=f"reload failed: {exc}")
            return
        if replacement is not None and replacement is not self.engine:
            self.engine = replacement
            for direction, setter in self._setters:
                setter(self._process_fn(direction))
        self._timer_due = 0.0  # SAs changed: ask for the next deadline again
        self.reloads += 1
        self._trace(TraceEventName.RELOAD, detail=f"reload {self.reloads}")

    def _on_error(self, exc: BaseException, queue: int) -> None:
        try:
            now = time.monotonic()
            if now - self._errors_logged >= 1.0:  # rate limit: at most one traceback a second
                self._errors_logged = now
                LOG.error("engine raised on queue %d; packet dropped", queue, exc_info=exc)
            if self.tracer.wants_drops:
                self.tracer.emit(TraceEventName.ERROR, component="nfqueue", queue=queue,
                                 detail=f"{type(exc).__name__}: {exc}")
        except Exception:  # noqa: BLE001 - never raise into the C callback
            pass

    def _trace(self, event: TraceEventName, **fields: object) -> None:
        if self.tracer.wants_drops:
            self.tracer.emit(event, component="nfqueue", queue=None, **fields)
            if self.trace_writer is not None:
                self.trace_writer.flush()

    def _queue_text(self) -> str:
        return ",".join(f"{q}({d.value})" for q, d in self.bindings)

    def processor_status(self) -> dict[str, Any]:
        """The adapter's own counters (``status`` puts them under ``processor``)."""
        directions = dict(self.bindings)
        batches = {q: {"verdict_sends": b.sends, "verdict_send_errors": b.send_errors} for q, b in self._batches.items()}
        return {
            "pid": os.getpid(),
            "role": self.role,
            "uptime": round(time.monotonic() - self._started, 3),
            "monotonic": time.monotonic(),  # SA ages (added_at) are measured on this clock
            "reloads": self.reloads,
            "trace_level": str(self.tracer.level),
            "queues": {
                str(q): {"direction": directions[q].value, **dict(zip(_COUNTER_NAMES, c, strict=True)),
                         **batches.get(q, {})}
                for q, c in self.counts.items()
            },
        }


def _default_reload(engine: Engine) -> Engine | None:
    reload = getattr(engine, "reload", None)
    if not callable(reload):
        raise ProcessorError("this engine has no reload(); restart the processor instead")
    result = reload()
    return result if hasattr(result, "process_outbound") else None


# -- processes -----------------------------------------------------------------------------------


def worker_socket(control_socket: str, direction: Direction) -> str:
    """Where a worker's private control socket lives when ``workers = 2``."""
    return f"{control_socket}.{direction.value}"


def _bindings(queues: QueueSettings, direction: Direction | None) -> list[tuple[int, Direction]]:
    out = [(q, Direction.OUT) for q in queues.outbound] if direction in (None, Direction.OUT) else []
    inn = [(q, Direction.IN) for q in queues.inbound] if direction in (None, Direction.IN) else []
    return out + inn


def run_worker(
    cfg: ProcessorConfig,
    engine_factory: EngineFactory,
    direction: Direction | None = None,
    control_path: str | None = None,
    on_reload: ReloadHook | None = None,
    ready: Callable[[], None] | None = None,
) -> int:
    """One process: build the engine, bind the queues, serve until SIGTERM/SIGINT. Returns 0.

    ``ready()`` is called once the queues are bound (the supervisor waits for it)."""
    writer = open_trace_writer(cfg.trace)
    tracer = Tracer(writer.write if writer else None, cfg.trace.level, component="bits")
    try:
        engine = engine_factory(tracer, direction)
    except BaseException:
        if writer is not None:
            writer.close()
        raise
    proc = Processor(
        engine, _bindings(cfg.queues, direction), tracer, trace_writer=writer,
        control_path=control_path if control_path is not None else cfg.control_socket,
        maxlen=cfg.queues.maxlen, on_reload=on_reload, role=direction.value if direction else "both",
    )
    serve_with_signals(proc, ready)
    LOG.info("stopped")
    return 0


def serve_with_signals(proc: Processor, ready: Callable[[], None] | None = None) -> None:
    """Bind, serve until SIGTERM/SIGINT (SIGHUP reloads), close. Main thread only."""
    with _signals(proc.request_stop, proc.request_reload, proc.wakeup_fd()):
        try:
            proc.bind()
            if ready is not None:
                ready()
            proc.serve()
        finally:
            proc.close()


@contextlib.contextmanager
def _signals(stop: Callable[[], None], reload: Callable[[], None], wake_fd: int):  # type: ignore[no-untyped-def]
    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    signal.signal(signal.SIGTERM, lambda *_: stop())
    signal.signal(signal.SIGINT, lambda *_: stop())
    signal.signal(signal.SIGHUP, lambda *_: reload())
    old_wake = signal.set_wakeup_fd(wake_fd, warn_on_full_buffer=False)
    try:
        yield
    finally:
        signal.set_wakeup_fd(old_wake)
        for s, handler in old.items():
            signal.signal(s, handler)


def run_processor(
    cfg: ProcessorConfig, engine_factory: EngineFactory, on_reload: ReloadHook | None = None
) -> int:
    """``mipbits run``: serve the node's queues until SIGTERM/SIGINT; returns an exit code.

    ``workers = 1``: this process does everything. ``workers = 2``: fork an outbound and an
    inbound worker and supervise them (see the module docstring).
    """
    _check_queues(cfg.queues)
    if cfg.queues.workers == 1:
        return run_worker(cfg, engine_factory, None, cfg.control_socket, on_reload)
    return Supervisor(cfg, engine_factory, on_reload).run()


def _check_queues(queues: QueueSettings) -> None:
    if queues.workers not in (1, 2):
        raise ProcessorError(f"workers must be 1 or 2, got {queues.workers}")
    if not queues.outbound or not queues.inbound:
        raise ProcessorError("both an outbound and an inbound queue are needed")
    if set(queues.outbound) & set(queues.inbound):
        raise ProcessorError("a queue cannot be both outbound and inbound")


class Supervisor:
    """``workers = 2``: one outbound and one inbound worker process, one public control socket."""

    def __init__(self, cfg: ProcessorConfig, engine_factory: EngineFactory, on_reload: ReloadHook | None) -> None:
        self.cfg = cfg
        self.engine_factory = engine_factory
        self.on_reload = on_reload
        self.children: dict[Direction, int] = {}
        self._reports: dict[Direction, int] = {}  # start-up report pipes (read ends)
        self._stop = False
        self._hup = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)

    def run(self) -> int:
        with _signals(self._request_stop, self._request_hup, self._wake_w.fileno()):
            signal.signal(signal.SIGCHLD, lambda *_: None)  # only to wake the loop
            try:
                control = ControlServer(self.cfg.control_socket, self._handle)
                try:
                    for direction in (Direction.OUT, Direction.IN):
                        self.children[direction] = self._spawn(direction, control)
                    if not self._await_ready():
                        return self._stop_children()  # stopped while starting
                    return self._loop(control)
                finally:
                    control.close()
            finally:
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                self._stop_children()
                self._wake_r.close()
                self._wake_w.close()

    def _spawn(self, direction: Direction, control: ControlServer) -> int:
        """Fork one worker. It reports "ok" (queues bound) or its start-up error on a pipe."""
        report_r, report_w = os.pipe()
        pid = os.fork()
        if pid:
            os.close(report_w)
            self._reports[direction] = report_r
            return pid
        code = 1
        try:
            os.close(report_r)
            # Until run_worker installs its handlers: SIGTERM ends us, SIGHUP is ignored.
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            signal.set_wakeup_fd(-1)
            control.close_inherited()
            for fd in self._reports.values():
                os.close(fd)
            _die_with_parent()
            path = worker_socket(self.cfg.control_socket, direction)
            code = run_worker(self.cfg, self.engine_factory, direction, path, self.on_reload,
                              ready=lambda: os.write(report_w, b"ok\n"))
        except BaseException as exc:  # noqa: BLE001 - report, then leave the child
            with contextlib.suppress(OSError):
                os.write(report_w, f"error {exc}\n".encode()[:4000])
            LOG.error("%s worker failed: %s", direction.value, exc, exc_info=not isinstance(exc, BitsError))
        finally:
            logging.shutdown()
            os._exit(code)

    def _await_ready(self, timeout: float = 60.0) -> bool:
        """Wait until both workers bound their queues; ProcessorError with a worker's start-up
        error (e.g. a bad SA file) so the command line can print it. False: stopped meanwhile."""
        pending = dict(self._reports)
        deadline = time.monotonic() + timeout
        try:
            while pending:
                if self._stop:
                    return False
                if time.monotonic() > deadline:
                    raise ProcessorError(f"workers not ready after {timeout:.0f} s: {sorted(d.value for d in pending)}")
                ready, _, _ = select.select(list(pending.values()), [], [], 0.2)
                for direction, fd in list(pending.items()):
                    if fd in ready:
                        line = os.read(fd, 4096).decode(errors="replace").strip()
                        if line != "ok":
                            why = line.removeprefix("error ") or "exited during start-up"
                            raise ProcessorError(f"{direction.value} worker: {why}")
                        del pending[direction]
            return True
        finally:
            for fd in self._reports.values():
                os.close(fd)
            self._reports.clear()

    def _loop(self, control: ControlServer) -> int:
        sel = selectors.DefaultSelector()
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        sel.register(control.fileno(), selectors.EVENT_READ, "control")
        try:
            while True:
                for key, _ in sel.select(MAX_TIMER_WAIT):
                    if key.data == "wake":
                        with contextlib.suppress(OSError):
                            self._wake_r.recv(4096)
                control.service(0)
                if self._stop:
                    return self._stop_children()
                if self._hup:
                    self._hup = False
                    self._signal_children(signal.SIGHUP)
                code = self._reap()
                if code is not None:
                    return code
        finally:
            sel.close()

    def _reap(self) -> int | None:
        """A worker that exits on its own takes the node down (fail closed, exit non-zero)."""
        for direction, pid in list(self.children.items()):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                del self.children[direction]
                LOG.error("%s worker (pid %d) exited with status %d; stopping", direction.value, pid, status)
                self._stop_children()
                return 1
        return None

    def _request_stop(self) -> None:
        self._stop = True

    def _request_hup(self) -> None:
        self._hup = True

    def _signal_children(self, sig: int) -> None:
        for pid in self.children.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def _stop_children(self, timeout: float = 10.0) -> int:
        self._signal_children(signal.SIGTERM)
        code = 0
        deadline = time.monotonic() + timeout
        for direction, pid in list(self.children.items()):
            status = _wait_until(pid, deadline)
            code = code or (0 if status == 0 else 1)
            del self.children[direction]
        return code

    def _handle(self, request: Mapping[str, Any]) -> Any:
        cmd = request["cmd"]
        sock = self.cfg.control_socket
        ask = lambda d: control_request(worker_socket(sock, d), cmd, **{k: v for k, v in request.items() if k != "cmd"})  # noqa: E731
        if cmd == "query_outbound":
            return ask(Direction.OUT)
        if cmd == "query_inbound_spi":
            return ask(Direction.IN)
        if cmd == "ping":
            return {"pid": os.getpid(), "workers": {d.value: ask(d) for d in (Direction.OUT, Direction.IN)}}
        if cmd == "status":
            return merge_status(ask(Direction.OUT), ask(Direction.IN))
        raise ControlError(f"unknown cmd {cmd!r} (status, query_outbound, query_inbound_spi, ping)")


def _wait_until(pid: int, deadline: float) -> int:
    """Exit code of child ``pid``; SIGKILL it at ``deadline``."""
    try:
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return os.waitstatus_to_exitcode(status)
            if time.monotonic() >= deadline:
                LOG.error("worker %d did not stop in time; killing it", pid)
                os.kill(pid, signal.SIGKILL)
                _, status = os.waitpid(pid, 0)
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.02)
    except ChildProcessError:
        return 0


def _die_with_parent() -> None:
    """prctl(PR_SET_PDEATHSIG, SIGTERM): a worker must not outlive its supervisor."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    if os.getppid() == 1:
        os._exit(1)


# -- status of two workers -----------------------------------------------------------------------


def merge_status(out_status: Mapping[str, Any], in_status: Mapping[str, Any]) -> dict[str, Any]:
    """One ``status`` from the outbound and inbound workers' (schema: ``mipbits.render``).

    SAs come from the worker that owns their direction; policy hits and drop counters add up;
    the processors appear under ``processor.workers``.
    """
    merged: dict[str, Any] = {}
    for key in set(out_status) | set(in_status):
        a, b = out_status.get(key), in_status.get(key)
        if key == "sas":
            merged[key] = _merge_sas(a or [], b or [])
        elif key == "policies":
            merged[key] = _merge_policies(a or [], b or [])
        elif key == "processor":
            merged[key] = {"role": "supervisor", "pid": os.getpid(), "workers": {"out": a, "in": b}}
        else:
            merged[key] = _add(a, b)
    return merged


def _merge_sas(out_sas: list[Any], in_sas: list[Any]) -> list[Any]:
    picked = [sa for sa in out_sas if sa.get("direction") != "in"]
    picked += [sa for sa in in_sas if sa.get("direction") == "in"]
    return picked


def _merge_policies(a: Any, b: Any) -> Any:
    """Policy rows (a list, or ``{"out": [...], "in": [...], ...}``): hits add up per entry."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return {k: _merge_policies(a.get(k), b.get(k)) for k in set(a) | set(b)}
    if isinstance(a, list) and isinstance(b, list):
        merged = [dict(row) for row in a]
        index = {_row_key(row, i): row for i, row in enumerate(merged)}
        for i, row in enumerate(b):
            mine = index.get(_row_key(row, i))
            if mine is None:
                merged.append(dict(row))
            else:
                mine["hits"] = mine.get("hits", 0) + row.get("hits", 0)
        return merged
    return _add(a, b)


def _row_key(row: Mapping[str, Any], i: int) -> object:
    return row.get("name", row.get("index", i))


def _add(a: Any, b: Any) -> Any:
    """Numbers add, dicts merge recursively, otherwise the outbound worker's value wins."""
    if a is None:
        return b
    if b is None:
        return a
    if isinstance(a, bool) or isinstance(b, bool):
        return a
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a + b
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return {k: _add(a.get(k), b.get(k)) for k in set(a) | set(b)}
    return a
