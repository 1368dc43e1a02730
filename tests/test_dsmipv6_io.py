"""The DSMIPv6 adapters (``mobility.io.udp4191``) without namespaces: the UDP socket over
loopback (source chosen per datagram with IP_PKTINFO), ``RouteSender`` dispatch and error
counting, the loop steps with fakes, and ``control_inbound_seq`` against a real control socket
serving a real engine (the raw protocol-41 socket needs root: tests/test_netns_dsmipv6.py)."""

from __future__ import annotations

import errno
import os
import tempfile
import threading
from collections.abc import Iterator

import pytest

from bits.engine import build_engine
from bits.io.control import ControlServer, make_engine_handler
from bits.setkey import parse_setkey
from bits.verdict import Drop
from mobility.io.udp4191 import Counters, RouteSender, UdpTunnelSocket, control_inbound_seq, service_udp
from mobility.tunnel import EngineQueryError, Route, TunnelDrop
from mobility.udp4191 import Encap, Ipv4Path, ipip_path, udp_path
from tests.test_dsmipv6 import HA, HOA, SAS, bu_v4, esp_of, mn_engine


def test_udp_socket_sends_from_the_chosen_source_and_reports_the_outer_endpoint():
    with UdpTunnelSocket("127.0.0.1", 0) as ha, UdpTunnelSocket("0.0.0.0", 0) as mn:
        mn.send(b"hello", "127.0.0.1", ha.port, src="127.0.0.1")
        ha.sock.setblocking(True)
        payload, (src, sport) = ha.recv()
        assert (payload, src, sport) == (b"hello", "127.0.0.1", mn.port)
        ha.sock.setblocking(False)
        assert ha.recv() is None


class FakeUdp:
    def __init__(self, fail: int | None = None) -> None:
        self.sent: list[tuple] = []
        self.fail = fail

    def send(self, payload, dst, port, src=None) -> None:
        if self.fail:
            raise OSError(self.fail, os.strerror(self.fail))
        self.sent.append((payload, dst, port, src))


class FakeIpip:
    def __init__(self) -> None:
        self.sent: list[tuple] = []

    def send(self, payload, dst, src=None) -> None:
        self.sent.append((payload, dst, src))


def test_route_sender_dispatches_by_path_and_counts_failures():
    wire: list[tuple] = []
    udp, ipip = FakeUdp(), FakeIpip()
    sender = RouteSender(lambda p, r: wire.append((p, r)), udp, ipip)  # type: ignore[arg-type]
    sender.send(b"a", udp_path("203.0.113.1", 4191, "192.168.1.100"))
    sender.send(b"b", ipip_path("203.0.113.1", "198.51.100.100"))
    sender.send(b"c", Route.WIRE)
    assert udp.sent == [(b"a", "203.0.113.1", 4191, "192.168.1.100")]
    assert ipip.sent == [(b"b", "203.0.113.1", "198.51.100.100")]
    assert wire == [(b"c", Route.WIRE)] and sender.sent == {"udp": 1, "ipip": 1, "wire": 1, "local4": 0}

    broken = RouteSender(None, FakeUdp(fail=errno.EADDRNOTAVAIL), None)  # type: ignore[arg-type]
    broken.send(b"a", udp_path("203.0.113.1"))  # the old CoA is gone: counted, not raised
    broken.send(b"b", ipip_path("203.0.113.1"))
    broken.send(b"c", Route.LOCAL)
    assert broken.errors == {"EADDRNOTAVAIL": 1, "no-ipip-socket": 1, "no-ipv6-sender": 1}


class FakeSock:
    def __init__(self, datagrams: list) -> None:
        self.datagrams = list(datagrams)

    def recv(self):
        return self.datagrams.pop(0) if self.datagrams else None


class FakeTunnel:
    def inbound_udp(self, payload, src, sport, now):
        if payload == b"boom":
            raise RuntimeError("a bug")
        return TunnelDrop.WRONG_PEER if src != "203.0.113.1" else payload


def test_service_udp_writes_accepted_packets_into_the_tun_and_counts_the_rest():
    written: list[bytes] = []
    counters = Counters()
    sock = FakeSock([(b"good", ("203.0.113.1", 4191)), (b"bad", ("203.0.113.66", 1)),
                     (b"boom", ("203.0.113.1", 4191))])
    n = service_udp(sock, FakeTunnel(), written.append, 1.0, counters)  # type: ignore[arg-type]
    assert n == 3 and written == [b"good"]
    assert counters.counts == {"tun": 1, "dropped": 1, "errors": 1}


@pytest.fixture()
def ha_control() -> Iterator[tuple[str, object]]:
    spd = f"spdadd {HOA} {HA} mh bu -P in ipsec esp/transport//unique:1;\nspddefault in bypass;\n"
    engine = build_engine(parse_setkey(SAS + spd, local_addresses=[HA]), rand=lambda n: bytes(n), now=0.0)
    d = tempfile.mkdtemp(prefix="mbd-ctl-", dir="/tmp")
    path = os.path.join(d, "ctl.sock")
    server, stop = ControlServer(path, make_engine_handler(lambda: engine)), threading.Event()

    def loop() -> None:
        while not stop.is_set():
            server.service(0.05)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield path, engine
    finally:
        stop.set()
        thread.join()
        server.close()
        os.rmdir(d)


def test_control_inbound_seq_reads_the_engines_replay_edge(ha_control):
    path, engine = ha_control
    seq_of = control_inbound_seq(path)
    assert seq_of(0x1001) == 0
    mn_e = mn_engine()
    for i in range(3):  # three BUs authenticated by the HA's engine
        assert not isinstance(engine.process_inbound(esp_of(mn_e, bu_v4(i + 1, "192.168.1.100")), 1.0), Drop)
    assert seq_of(0x1001) == 3
    assert seq_of(0x9999) is None


def test_control_inbound_seq_unreachable_is_an_engine_query_error():
    with pytest.raises(EngineQueryError):
        control_inbound_seq("/nonexistent/mipbits.sock")(0x1001)


def test_path_text_for_traces():
    assert Ipv4Path(Encap.UDP, "203.0.113.2", 50000).text() == "udp 203.0.113.2:50000"
    assert ipip_path("198.51.100.100").text() == "ipip 198.51.100.100"
