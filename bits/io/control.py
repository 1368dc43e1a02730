"""The control socket: a Unix-domain stream socket speaking line-delimited JSON, root only.

Request  ``{"cmd": "status"}``, ``{"cmd": "query_outbound", "src": "10.0.0.1", "dst": "10.0.0.2",
"proto": "udp", "dport": 53}``, ``{"cmd": "query_inbound_spi", "spi": "0x1000"}``, ``{"cmd": "ping"}``.
Response ``{"ok": true, "result": ...}`` or ``{"ok": false, "error": "..."}``, one line each.

Access: the socket file is created 0600 (under a umask, so it is never briefly wider) and every
peer's credentials (``SO_PEERCRED``) must be root or our own uid.

``ControlServer`` never blocks the data path: it owns an epoll selector whose fd the processor's
loop watches; ``service()`` handles whatever is ready and returns. Replies are small JSON lines
written with a short send timeout.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import json
import os
import selectors
import socket
import stat
import struct
from collections.abc import Callable, Mapping
from typing import Any

from ..constants import IpProto
from ..errors import BitsError

MAX_LINE = 64 * 1024
MAX_CLIENTS = 16
SEND_TIMEOUT = 0.5
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid

Handler = Callable[[Mapping[str, Any]], Any]


class ControlError(BitsError):
    """A control request failed (no processor, permission, or the processor said no)."""


class RequestError(ControlError):
    """A malformed request; the server answers ``ok: false`` with this message."""


# -- server --------------------------------------------------------------------------------------


class ControlServer:
    """Serve ``handler(request) -> result`` on ``path``. Single-threaded, non-blocking."""

    def __init__(self, path: str | os.PathLike[str], handler: Handler) -> None:
        self.path = os.fspath(path)
        self.handler = handler
        self._sel = selectors.DefaultSelector()
        self._buf: dict[socket.socket, bytes] = {}
        self._listener = _listen(self.path)
        self._sel.register(self._listener, selectors.EVENT_READ)

    def fileno(self) -> int:
        """A pollable fd (the epoll instance): readable when something needs ``service()``."""
        return self._sel.fileno()

    def service(self, timeout: float = 0.0) -> None:
        for key, _ in self._sel.select(timeout):
            sock: socket.socket = key.fileobj  # type: ignore[assignment]
            if sock is self._listener:
                self._accept()
            else:
                self._read(sock)

    def close(self) -> None:
        for sock in list(self._buf):
            self._drop(sock)
        self._sel.unregister(self._listener)
        self._listener.close()
        self._sel.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def close_inherited(self) -> None:
        """In a forked child: close our copies of the fds, leave the socket file to the parent."""
        for sock in list(self._buf):
            sock.close()
        self._listener.close()
        self._sel.close()

    def _accept(self) -> None:
        try:
            conn, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        if len(self._buf) >= MAX_CLIENTS or not _peer_allowed(conn):
            conn.close()
            return
        conn.setblocking(False)
        self._buf[conn] = b""
        self._sel.register(conn, selectors.EVENT_READ)

    def _read(self, sock: socket.socket) -> None:
        try:
            data = sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop(sock)
            return
        buf = self._buf[sock] + data
        *lines, rest = buf.split(b"\n")
        if len(rest) > MAX_LINE:
            self._drop(sock)
            return
        self._buf[sock] = rest
        for line in lines:
            if line.strip() and not self._answer(sock, line):
                return

    def _answer(self, sock: socket.socket, line: bytes) -> bool:
        reply = handle_line(self.handler, line)
        try:
            sock.settimeout(SEND_TIMEOUT)
            sock.sendall(reply)
            sock.setblocking(False)
        except OSError:
            self._drop(sock)
            return False
        return True

    def _drop(self, sock: socket.socket) -> None:
        self._buf.pop(sock, None)
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(sock)
        sock.close()


def handle_line(handler: Handler, line: bytes) -> bytes:
    """One request line -> one reply line. Never raises."""
    try:
        request = json.loads(line)
        if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
            raise RequestError('a request is a JSON object with a string "cmd"')
        reply = {"ok": True, "result": handler(request)}
    except RequestError as exc:
        reply = {"ok": False, "error": str(exc)}
    except ValueError as exc:  # JSON, or a bad value inside a request
        reply = {"ok": False, "error": f"bad request: {exc}"}
    except Exception as exc:  # noqa: BLE001 - a bug behind the handler must not kill the processor
        reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    return (json.dumps(reply, default=_json_default, separators=(",", ":")) + "\n").encode()


def _json_default(value: object) -> object:
    if hasattr(value, "value"):  # enums
        return value.value  # type: ignore[attr-defined]
    if isinstance(value, (bytes, bytearray)):
        return value.hex()
    return str(value)


def _listen(path: str) -> socket.socket:
    _remove_stale(path)
    os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    except OSError:
        sock.close()
        raise
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(8)
    sock.setblocking(False)
    return sock


def _remove_stale(path: str) -> None:
    """Unlink a socket file nobody listens on; refuse if a processor still answers there."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ControlError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
            os.unlink(path)
            return
        raise ControlError(f"{path}: {exc.strerror}") from None
    finally:
        probe.close()
    raise ControlError(f"{path}: another processor is already listening there")


def _peer_allowed(conn: socket.socket) -> bool:
    try:
        _pid, uid, _gid = _PEERCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
    except OSError:
        return False
    return uid in (0, os.geteuid())


# -- the engine's commands -----------------------------------------------------------------------


def make_engine_handler(
    get_engine: Callable[[], Any], extra_status: Callable[[], Mapping[str, Any]] | None = None
) -> Handler:
    """Dispatch ``status`` / ``query_outbound`` / ``query_inbound_spi`` / ``ping`` to the engine.

    ``get_engine`` is called per request (the engine may be replaced on reload). ``extra_status``
    adds the processor's own counters under ``processor``.
    """

    def handle(request: Mapping[str, Any]) -> Any:
        cmd = request["cmd"]
        if cmd == "ping":
            return {"pid": os.getpid()}
        if cmd == "status":
            status = dict(get_engine().status())
            if extra_status is not None:
                status["processor"] = dict(extra_status())
            return status
        if cmd == "query_outbound":
            return get_engine().query_outbound(selectors_from_request(request.get("sel", request)))
        if cmd == "query_inbound_spi":
            return get_engine().query_inbound_spi(parse_spi(request.get("spi")))
        raise RequestError(f"unknown cmd {cmd!r} (status, query_outbound, query_inbound_spi, ping)")

    return handle


def parse_spi(value: object) -> int:
    """``4096``, ``"4096"`` or ``"0x1000"`` -> int in 0..2**32-1."""
    try:
        spi = int(value, 0) if isinstance(value, str) else int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise RequestError(f"spi must be an integer, got {value!r}") from None
    if not 0 <= spi <= 0xFFFFFFFF:
        raise RequestError(f"spi {spi} out of range")
    return spi


_PROTO_NAMES = {"icmp": IpProto.ICMP, "tcp": IpProto.TCP, "udp": IpProto.UDP, "icmpv6": IpProto.ICMPV6,
                "ipv6-icmp": IpProto.ICMPV6, "mh": IpProto.MH, "esp": IpProto.ESP, "any": 255}


def parse_proto(value: object) -> int:
    if isinstance(value, str):
        name = value.strip().lower()
        if name in _PROTO_NAMES:
            return int(_PROTO_NAMES[name])
        value = name
    try:
        proto = int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise RequestError(f"proto must be a number or one of {sorted(_PROTO_NAMES)}, got {value!r}") from None
    if not 0 <= proto <= 255:
        raise RequestError(f"proto {proto} out of range")
    return proto


def selectors_from_request(sel: Mapping[str, Any]) -> Any:
    """A query's selector fields -> ``bits.ip.PacketSelectors`` (addresses as ints)."""
    from ..ip import PacketSelectors

    try:
        src = ipaddress.ip_address(sel["src"])
        dst = ipaddress.ip_address(sel["dst"])
    except KeyError as exc:
        raise RequestError(f"query_outbound needs {exc.args[0]!r}") from None
    except ValueError as exc:
        raise RequestError(str(exc)) from None
    if src.version != dst.version:
        raise RequestError("src and dst must be the same IP version")

    def opt_int(name: str, limit: int) -> int | None:
        value = sel.get(name)
        if value is None:
            return None
        try:
            n = int(value)
        except (TypeError, ValueError):
            raise RequestError(f"{name} must be an integer, got {value!r}") from None
        if not 0 <= n <= limit:
            raise RequestError(f"{name} {n} out of range")
        return n

    return PacketSelectors(
        src.version, int(src), int(dst), parse_proto(sel.get("proto", 255)),
        opt_int("sport", 65535), opt_int("dport", 65535),
        opt_int("icmp_type", 255), opt_int("icmp_code", 255), opt_int("mh_type", 255),
    )


# -- client --------------------------------------------------------------------------------------


def control_request(path: str | os.PathLike[str], cmd: str, timeout: float = 5.0, **args: Any) -> Any:
    """Send one request, return its ``result``; ControlError with a readable message otherwise."""
    path = os.fspath(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except FileNotFoundError:
        sock.close()
        raise ControlError(f"no control socket at {path}: is the processor running?") from None
    except PermissionError:
        sock.close()
        raise ControlError(f"{path}: permission denied (the control socket is root only)") from None
    except ConnectionRefusedError:
        sock.close()
        raise ControlError(f"{path}: connection refused (stale socket: the processor is not running)") from None
    try:
        sock.sendall((json.dumps({"cmd": cmd, **args}) + "\n").encode())
        reply = _read_line(sock)
    except TimeoutError:
        raise ControlError(f"{path}: no answer within {timeout} s") from None
    finally:
        sock.close()
    return _result(path, reply)


def _read_line(sock: socket.socket) -> bytes:
    buf = b""
    while b"\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            break
        buf += chunk
    return buf.split(b"\n", 1)[0]


def _result(path: str, reply: bytes) -> Any:
    if not reply:
        raise ControlError(f"{path}: the processor closed the connection without answering")
    try:
        msg = json.loads(reply)
    except ValueError:
        raise ControlError(f"{path}: unreadable answer {reply[:80]!r}") from None
    if not msg.get("ok"):
        raise ControlError(msg.get("error", "request failed"))
    return msg.get("result")
