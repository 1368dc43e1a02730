"""Engine results of another IP version than the packet the engine was given.

A tunnel-mode SA may carry IPv4 inside IPv6 or IPv6 inside IPv4 (RFC 4301 5.1.2: the outer and
the inner header are independent; ``bits.esp`` builds and takes apart both). NFQUEUE cannot carry
such a result: a verdict's new payload replaces the packet *inside the same skb*, whose protocol
(and the hook it sits in: ``iptables`` vs ``ip6tables``) is fixed. An IPv4 packet protected by an
IPv6 SA cannot be set back into the IPv4 skb, and an inner IPv4 packet decapsulated from IPv6 ESP
cannot be set into the IPv6 skb.

So the adapter **drops the queued original and emits the result itself**, through a raw socket of
the result's family (``IPPROTO_RAW``: the header is ours), marked with ``EMITTED_MARK``. The
engine's own rules ``RETURN`` on that mark (``bits.io.iptables``: first rule of both chains), so
the emitted packet is not queued again:

* outbound results (the ESP packet) leave as local output: routed by their outer destination,
  through mangle OUTPUT (skipped by the mark), out of the interface the route names;
* inbound results (the decapsulated inner packet) addressed to this host are delivered by the
  kernel: a raw-sent packet whose destination is a local address is looped back (``lo``) and
  delivered with the route of its output, whatever its (remote) source -- no ``rp_filter`` check,
  checked in a namespace (tests/test_netns_dsmipv6_crossfamily.py); our inbound chain RETURNs for
  ``lo`` anyway. An inner packet for another host leaves like an outbound result: a raw send does
  not decrement the TTL / Hop Limit (the forwarding step of RFC 4301 5.2 happens before the engine
  here, in the kernel that routed the outer packet to us).

``CrossFamilyEmitter`` owns the two sockets (opened on first use) and counts what it sent and
which errors the kernel gave. The NFQUEUE callback needs one test per *changed* packet::

    if (out[0] ^ payload[0]) & 0xF0:   # another IP version
        emit(out); verdict(pkt, NF_DROP, None)

``CrossFamilyEngine`` gives any engine that behaviour without touching the adapter: it wraps
``process_outbound`` / ``process_inbound``, emits a cross-family result and returns
``Drop(DropReason.CROSS_FAMILY)`` so the adapter drops the original; everything else is delegated.

No knowledge of what rides in the tunnel: generic tunnel-mode plumbing.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Mapping
from typing import Any

from ..verdict import Drop, DropReason

#: Packets the engine (or an adapter after it) already processed: the engine's rules RETURN on it.
EMITTED_MARK = 0x00400000
SO_MARK = getattr(socket, "SO_MARK", 36)
IPV4_MIN_HEADER = 20
IPV6_HEADER = 40

_FAMILY = {4: socket.AF_INET, 6: socket.AF_INET6}
EMITTED = Drop(DropReason.CROSS_FAMILY)


def other_version(packet: bytes, result: bytes) -> bool:
    """Is ``result`` of another IP version than ``packet``? (Both non-empty.)"""
    return bool((result[0] ^ packet[0]) & 0xF0)


def _destination(packet: bytes) -> tuple[int, str] | None:
    """(version, destination text) of a whole IP packet; None when it is neither."""
    version = packet[0] >> 4
    if version == 4 and len(packet) >= IPV4_MIN_HEADER:
        return 4, socket.inet_ntop(socket.AF_INET, packet[16:20])
    if version == 6 and len(packet) >= IPV6_HEADER:
        return 6, socket.inet_ntop(socket.AF_INET6, packet[24:40])
    return None


class CrossFamilyEmitter:
    """Raw sockets (one per IP version, opened on first use) that send whole IP packets marked
    ``mark``. ``emit`` never raises: failures are counted by errno name in ``errors``."""

    def __init__(self, mark: int = EMITTED_MARK) -> None:
        self.mark = mark
        self._socks: dict[int, socket.socket] = {}
        self.sent = {"ipv4": 0, "ipv6": 0}
        self.errors: dict[str, int] = {}

    def emit(self, packet: bytes) -> bool:
        """Send ``packet`` (IPv4 or IPv6, header included) to its destination; True when the
        kernel took it."""
        where = _destination(packet)
        if where is None:
            self._error("not-ip")
            return False
        version, dst = where
        try:
            sock = self._socks.get(version) or self._open(version)
            sock.sendto(packet, (dst, 0))
        except OSError as exc:
            self._error(errno.errorcode.get(exc.errno or 0, str(exc.errno)))
            return False
        self.sent["ipv4" if version == 4 else "ipv6"] += 1
        return True

    def _open(self, version: int) -> socket.socket:
        sock = socket.socket(_FAMILY[version], socket.SOCK_RAW, socket.IPPROTO_RAW)
        try:
            if self.mark:
                sock.setsockopt(socket.SOL_SOCKET, SO_MARK, self.mark)
        except OSError:
            sock.close()
            raise
        self._socks[version] = sock
        return sock

    def _error(self, name: str) -> None:
        self.errors[name] = self.errors.get(name, 0) + 1

    def status(self) -> dict[str, Any]:
        return {"mark": f"{self.mark:#x}", "sent": dict(self.sent), "errors": dict(self.errors)}

    def close(self) -> None:
        for sock in self._socks.values():
            sock.close()
        self._socks.clear()


class CrossFamilyEngine:
    """An engine whose cross-family results leave through ``emitter`` (see the module
    docstring); the adapter receives ``EMITTED`` (a ``Drop``) for them and drops the original.
    Every other attribute is the wrapped engine's (status gets an ``emitted`` part)."""

    def __init__(self, engine: Any, emitter: CrossFamilyEmitter) -> None:
        self.engine = engine
        self.emitter = emitter
        self.process_outbound = self._wrap(engine.process_outbound)
        self.process_inbound = self._wrap(engine.process_inbound)

    def _wrap(self, process: Any) -> Any:
        emit = self.emitter.emit

        def run(packet: bytes, now: float) -> Any:
            out = process(packet, now)
            if out and out is not packet and (out[0] ^ packet[0]) & 0xF0:
                emit(bytes(out))
                return EMITTED
            return out

        return run

    def status(self) -> dict[str, Any]:
        st: Mapping[str, Any] = self.engine.status()
        return {**st, "emitted": self.emitter.status()}

    def close(self) -> None:
        try:
            close = getattr(self.engine, "close", None)
            if callable(close):
                close()
        finally:
            self.emitter.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)


__all__ = ["EMITTED", "EMITTED_MARK", "CrossFamilyEmitter", "CrossFamilyEngine", "other_version"]
