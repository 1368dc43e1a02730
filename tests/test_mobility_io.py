"""The mobility adapters without a kernel: hook verdicts on fake queued packets, the rules and
route commands they would run (recorded by a fake runner), the TUN pump, the unsolicited NA, and
the engine queries over a real control socket."""

from __future__ import annotations

import ipaddress
import os
import tempfile
import threading
from collections.abc import Iterator, Sequence

import pytest
from scapy.layers.inet6 import ICMPv6ND_NA, ICMPv6NDOptDstLLAddr

from bits.engine import build_engine
from bits.io.control import ControlServer, make_engine_handler, selectors_from_request
from bits.ip import PacketSelectors
from bits.setkey import parse_setkey
from mobility.io.classify import control_queries, selector_request
from mobility.io.hook import CHAIN_IN, CHAIN_OUT, HookRules, InboundHook, chain_rules
from mobility.io.routes import (
    HOOK_MARK,
    SEND_MARK,
    HaRoutes,
    MnRoutes,
    NetConfig,
    RoutesError,
    push_unsolicited_na,
)
from mobility.io.tun import pump
from mobility.tunnel import (
    ApiClassifier,
    EngineQueryError,
    MnTunnel,
    Reason,
    Route,
    TunnelDrop,
    transport_spi,
)

HOA, HA, COA = "2001:db8:1::100", "2001:db8:1::1", "2001:db8:f::100"


# --- hook verdicts ---------------------------------------------------------------------------------------------


class FakePacket:
    def __init__(self, payload: bytes, mark: int = 0x5) -> None:
        self.payload, self.mark, self.verdict = payload, mark, None

    def get_payload(self) -> bytes:
        return self.payload

    def set_payload(self, payload: bytes) -> None:
        self.payload = payload

    def get_mark(self) -> int:
        return self.mark

    def set_mark(self, mark: int) -> None:
        self.mark = mark

    def repeat(self) -> None:
        self.verdict = "repeat"

    def drop(self) -> None:
        self.verdict = "drop"


class FakeTunnel:
    def __init__(self, answer) -> None:
        self.answer, self.seen = answer, []

    def inbound(self, packet: bytes, now: float):
        self.seen.append((packet, now))
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


@pytest.mark.parametrize(
    "answer, verdict, payload, mark, counter",
    [
        (b"rewritten", "repeat", b"rewritten", 0x5 | HOOK_MARK, "rewritten"),
        (None, "repeat", b"original", 0x5 | HOOK_MARK, "unchanged"),
        (TunnelDrop.BAD_RH2, "drop", b"original", 0x5, "dropped"),
        (RuntimeError("bug"), "drop", b"original", 0x5, "errors"),
    ],
)
def test_hook_verdicts(answer, verdict, payload, mark, counter):
    hook = InboundHook(FakeTunnel(answer), clock=lambda: 42.0)
    pkt = FakePacket(b"original")
    hook.handle(pkt)
    assert (pkt.verdict, pkt.payload, pkt.mark) == (verdict, payload, mark)
    assert hook.counts[counter] == 1 and hook.tunnel.seen == [(b"original", 42.0)]


# --- commands (fake runner) ------------------------------------------------------------------------------------


class Recorder:
    """A Runner that records argv/stdin and answers from a table of outputs."""

    def __init__(self, outputs: dict[tuple[str, ...], str] | None = None, fail: set[tuple[str, ...]] | None = None):
        self.calls: list[tuple[tuple[str, ...], str | None]] = []
        self.outputs = outputs or {}
        self.fail = fail or set()

    def __call__(self, argv: Sequence[str], stdin: str | None = None) -> str:
        key = tuple(argv)
        self.calls.append((key, stdin))
        if key in self.fail:
            raise RoutesError(f"{' '.join(key)} failed")
        return self.outputs.get(key, "")

    def argvs(self) -> list[tuple[str, ...]]:
        return [c for c, _ in self.calls]


def test_hook_rules_text():
    rules = chain_rules(7)
    assert rules["raw"] == [
        f"-A {CHAIN_IN} -m mark --mark 0x200000/0x200000 -j RETURN",
        f"-A {CHAIN_IN} -p esp -j NFQUEUE --queue-num 7",
        f"-A {CHAIN_IN} -m ipv6header --header ipv6-opts --soft -j NFQUEUE --queue-num 7",
        f"-A {CHAIN_IN} -m rt --rt-type 2 -j NFQUEUE --queue-num 7",
    ]
    assert rules["mangle"] == [f"-A {CHAIN_OUT} -m mark --mark 0x100000/0x100000 -j ACCEPT"]
    assert "--queue-bypass" not in " ".join(rules["raw"])  # fail closed


def test_hook_rules_install_puts_the_jump_first_once():
    engine_jump = "-A PREROUTING -m comment --comment mipbits -j MIPBITS-IN"
    ours = f"-A PREROUTING -m comment --comment mipbits-mobility -j {CHAIN_IN}"
    run = Recorder({("ip6tables", "-t", "raw", "-S", "PREROUTING"): f"-P PREROUTING ACCEPT\n{engine_jump}\n{ours}\n"})
    HookRules(7, run).install()
    raw_script = next(stdin for argv, stdin in run.calls if argv[0] == "ip6tables-restore" and "*raw" in stdin)
    lines = raw_script.splitlines()
    assert lines[:2] == ["*raw", f":{CHAIN_IN} - [0:0]"]
    assert f"-D PREROUTING -m comment --comment mipbits-mobility -j {CHAIN_IN}" in lines
    assert lines[-2:] == [f"-I PREROUTING 1 -m comment --comment mipbits-mobility -j {CHAIN_IN}", "COMMIT"]
    assert engine_jump[2:] not in raw_script  # the engine's rule is left alone

    first = Recorder({("ip6tables", "-t", "raw", "-S", "PREROUTING"): f"{ours}\n{engine_jump}\n"})
    HookRules(7, first).install()
    raw_script = next(stdin for argv, stdin in first.calls if argv[0] == "ip6tables-restore" and "*raw" in stdin)
    assert "-I PREROUTING" not in raw_script and "-D PREROUTING" not in raw_script  # already first: refill only


def test_net_config_undo_in_reverse_and_sysctl_restore():
    run = Recorder({("sysctl", "-n", "net.ipv6.conf.all.forwarding"): "0\n",
                    ("sysctl", "-n", "net.ipv6.conf.eth0.proxy_ndp"): "1\n"})
    cfg = NetConfig(run)
    cfg.sysctl("a", "net.ipv6.conf.all.forwarding", "1")
    cfg.sysctl("a", "net.ipv6.conf.eth0.proxy_ndp", "1")  # already 1: nothing to change or undo
    cfg.change("b", ["ip", "x", "add"], ["ip", "x", "del"])
    cfg.change("b", ["ip", "y", "add"], ["ip", "y", "del"])
    run.calls.clear()
    run.fail = {("ip", "y", "del")}
    assert cfg.cleanup() == ["ip y del failed"]  # reported, and the rest still undone
    assert run.argvs() == [("ip", "y", "del"), ("ip", "x", "del"),
                           ("sysctl", "-qw", "net.ipv6.conf.all.forwarding=0")]
    assert cfg.groups() == []


def test_ha_routes_bind_unbind():
    run, announced = Recorder({("sysctl", "-n", "net.ipv6.conf.all.forwarding"): "0"}), []
    ha = HaRoutes("mip6tnl", "eth0", run, announce=lambda i, h: announced.append((i, h)))
    ha.bind(HOA)
    ha.bind(HOA)  # a new CoA: nothing to change here
    assert run.argvs() == [
        ("ip", "-6", "route", "replace", f"{HOA}/128", "dev", "mip6tnl"),
        ("ip", "-6", "neigh", "replace", "proxy", HOA, "dev", "eth0"),
    ]
    assert announced == [("eth0", HOA)]
    run.calls.clear()
    ha.unbind(HOA)
    assert run.argvs() == [("ip", "-6", "neigh", "del", "proxy", HOA, "dev", "eth0"),
                           ("ip", "-6", "route", "del", f"{HOA}/128", "dev", "mip6tnl")]


def test_mn_routes_away_move_home():
    run = Recorder({("ip", "-6", "-j", "route", "show", "default", "dev", "eth1"):
                    '[{"dst":"default","gateway":"fe80::1","dev":"eth1"}]'})
    mn = MnRoutes("mip6tnl", run)
    mn.setup()
    assert mn.default_gateway("eth1") == "fe80::1"
    run.calls.clear()
    mn.away(HOA, HA, "eth1", "fe80::1", 1402)
    assert run.argvs() == [
        ("ip", "-6", "addr", "add", f"{HOA}/128", "dev", "mip6tnl", "nodad"),
        ("ip", "-6", "route", "replace", f"{HA}/128", "dev", "mip6tnl"),
        ("ip", "-6", "route", "replace", "default", "dev", "mip6tnl", "metric", "1", "mtu", "1402"),
        ("ip", "-6", "route", "replace", "default", "via", "fe80::1", "dev", "eth1", "table", "201"),
    ]
    run.calls.clear()
    mn.away(HOA, HA, "eth2", "fe80::2", 1402)  # moved: only the marked packets' route changes
    assert run.argvs() == [
        ("ip", "-6", "route", "del", "default", "via", "fe80::1", "dev", "eth1", "table", "201"),
        ("ip", "-6", "route", "replace", "default", "via", "fe80::2", "dev", "eth2", "table", "201"),
    ]
    run.calls.clear()
    mn.home()
    assert [a[2:4] for a in run.argvs()] == [("route", "del"), ("route", "del"), ("route", "del"), ("addr", "del")]
    assert mn.groups() == ["setup"]
    mn.cleanup()
    assert run.argvs()[-1] == ("ip", "-6", "rule", "del", "pref", "1000", "fwmark",
                               f"{SEND_MARK:#x}/{SEND_MARK:#x}", "lookup", "201")


def test_unsolicited_na_is_what_scapy_expects():
    na = ICMPv6ND_NA(push_unsolicited_na(HOA, bytes.fromhex("020000000001")))
    assert (na.type, na.R, na.S, na.O, na.tgt) == (136, 1, 0, 1, HOA)
    assert na[ICMPv6NDOptDstLLAddr].lladdr == "02:00:00:00:00:01"


# --- the TUN pump --------------------------------------------------------------------------------------------------


class FakeDevice:
    def __init__(self, packets: list[bytes]) -> None:
        self.packets, self.written = list(packets), []

    def read(self) -> bytes | None:
        return self.packets.pop(0) if self.packets else None

    def write(self, packet: bytes) -> None:
        self.written.append(packet)


ROUTES_BY_FIRST_BYTE = {b"w": Route.WIRE, b"l": Route.LOCAL, b"t": Route.TUN}


class RouteByFirstByte:
    def outbound(self, packet: bytes, now: float) -> list[tuple[bytes, Route]]:
        return [] if packet == b"x" else [(packet, ROUTES_BY_FIRST_BYTE[packet[:1]])]


def test_pump_dispatches_by_route_and_batches():
    dev, sent = FakeDevice([b"w1", b"l1", b"t1", b"x", b"w2"]), []
    assert pump(dev, RouteByFirstByte(), lambda p, r: sent.append((p, r)), 0.0, batch=4) == 4
    assert sent == [(b"w1", Route.WIRE), (b"l1", Route.LOCAL)] and dev.written == [b"t1"]
    assert pump(dev, RouteByFirstByte(), lambda p, r: sent.append((p, r)), 0.0) == 1
    assert pump(dev, RouteByFirstByte(), lambda p, r: sent.append((p, r)), 0.0) == 0


# --- engine queries over the control socket -------------------------------------------------------------------------


SAS = f"""
add {HOA} {HA} esp 0x1001 -m transport -u 1 -E aes-gcm-16 0x{"11" * 20};
add {HOA} {HA} esp 0x1007 -m tunnel -u 7 -E aes-gcm-16 0x{"77" * 20};
spdadd {HOA} {HA} mh bu -P out ipsec esp/transport//unique:1;
spdadd {HOA} ::/0 any -P out ipsec esp/tunnel/{HOA}-{HA}/unique:7;
"""


@pytest.fixture()
def control() -> Iterator[str]:
    engine = build_engine(parse_setkey(SAS, local_addresses=[HOA]), rand=lambda n: bytes(n), now=0.0)
    d = tempfile.mkdtemp(prefix="mbt-ctl-", dir="/tmp")
    path = os.path.join(d, "ctl.sock")
    server, stop = ControlServer(path, make_engine_handler(lambda: engine)), threading.Event()

    def loop() -> None:
        while not stop.is_set():
            server.service(0.05)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield path
    finally:
        stop.set()
        thread.join()
        server.close()
        os.rmdir(d)


def test_selector_request_round_trips_through_the_control_parser():
    for sel in (PacketSelectors(6, 1, 2, 135, None, None, None, None, 5),
                PacketSelectors(6, 3, 4, 58, None, None, 146, 0)):
        assert selectors_from_request(selector_request(sel)) == sel


def test_api_classifier_over_the_control_socket(control):
    query_outbound, query_inbound_spi = control_queries(control)
    bu = PacketSelectors(6, int(ipaddress.IPv6Address(HOA)), int(ipaddress.IPv6Address(HA)), 135, mh_type=5)
    assert transport_spi(query_outbound(bu)) == 0x1001
    assert query_inbound_spi(0x1001) is None  # no inbound SA with that SPI on this node
    classifier = ApiClassifier(query_outbound)
    mn = MnTunnel(HOA, HA, classifier)
    hoa, ha = ipaddress.IPv6Address(HOA).packed, ipaddress.IPv6Address(HA).packed
    assert classifier.outbound(hoa, ha, 0x1001, False, 0.0) == (True, Reason.API_SIGNAL_SPI)
    assert classifier.outbound(hoa, ha, 0x1007, False, 0.0) == (False, Reason.API_OTHER_SPI)
    assert classifier.queries == 2 and mn.classifier is classifier


def test_unreachable_control_socket_is_an_engine_query_error():
    query_outbound, query_inbound_spi = control_queries("/nonexistent/mipbits.sock")
    with pytest.raises(EngineQueryError):
        query_outbound(PacketSelectors(6, 1, 2, 135, mh_type=5))
    with pytest.raises(EngineQueryError):
        query_inbound_spi(0x1001)
