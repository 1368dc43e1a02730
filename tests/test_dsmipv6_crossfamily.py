"""bits.io.crossfamily without a kernel: engine results of another IP version (IPv4 inside an
IPv6 tunnel SA -- the DSMIPv6 IPv4 home address) are handed to the emitter and the adapter is
told to drop the original; everything else passes through the wrapper untouched. Two real
engines (bits.engine) with 4in6 SAs; the emitter is a fake that keeps what it was given."""

from __future__ import annotations

import ipaddress
import os
import struct

from bits.engine import build_engine
from bits.io.crossfamily import EMITTED, EMITTED_MARK, CrossFamilyEmitter, CrossFamilyEngine, other_version
from bits.io.iptables import HOOK_IN, HOOK_OUT, IPV4, IPV6, RuleSettings, chain_rules
from bits.io.nfqueue import DROPPED, NF_DROP, make_callback
from bits.ip import push_ipv4_header, push_ipv6_header
from bits.setkey import parse_setkey
from bits.trace import Tracer
from bits.verdict import Drop, DropReason

A6, B6 = "2001:db8:1::100", "2001:db8:1::1"  # tunnel endpoints (the HoA, the HA)
A4, B4 = "198.18.1.100", "192.0.2.50"  # inside: the IPv4 home address, a correspondent

SAS = f"""
add {A6} {B6} esp 0x1007 -m tunnel -u 7 -E aes-gcm-16 0x{'07' * 20};
add {B6} {A6} esp 0x1008 -m tunnel -u 8 -E aes-gcm-16 0x{'08' * 20};
"""
SPD = {
    "a": f"""
spdadd {A4}/32 0.0.0.0/0 any -P out ipsec esp/tunnel/{A6}-{B6}/unique:7;
spdadd 0.0.0.0/0 {A4}/32 any -P in ipsec esp/tunnel/{B6}-{A6}/unique:8;
spdadd {A6} ::/0 any -P out ipsec esp/tunnel/{A6}-{B6}/unique:7;
spdadd ::/0 {A6} any -P in ipsec esp/tunnel/{B6}-{A6}/unique:8;
spddefault out bypass; spddefault in bypass;
""",
    "b": f"""
spdadd 0.0.0.0/0 {A4}/32 any -P out ipsec esp/tunnel/{B6}-{A6}/unique:8;
spdadd {A4}/32 0.0.0.0/0 any -P in ipsec esp/tunnel/{A6}-{B6}/unique:7;
spdadd ::/0 {A6} any -P out ipsec esp/tunnel/{B6}-{A6}/unique:8;
spdadd {A6} ::/0 any -P in ipsec esp/tunnel/{A6}-{B6}/unique:7;
spddefault out bypass; spddefault in bypass;
""",
}


class FakeEmitter(CrossFamilyEmitter):
    def __init__(self) -> None:
        super().__init__()
        self.packets: list[bytes] = []

    def emit(self, packet: bytes) -> bool:
        self.packets.append(packet)
        self.sent["ipv4" if packet[0] >> 4 == 4 else "ipv6"] += 1
        return True


def _engine(side: str) -> tuple[CrossFamilyEngine, FakeEmitter]:
    local = A6 if side == "a" else B6
    engine = build_engine(parse_setkey(SAS + SPD[side], local_addresses=[local]), rand=os.urandom, now=0.0)
    emitter = FakeEmitter()
    return CrossFamilyEngine(engine, emitter), emitter


def _udp4(src: str, dst: str, payload: bytes = b"x" * 40) -> bytes:
    body = struct.pack("!HHHH", 4000, 5000, 8 + len(payload), 0) + payload
    return push_ipv4_header(ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed, 17, 20 + len(body)) + body


def _udp6(src: str, dst: str, payload: bytes = b"y" * 40) -> bytes:
    body = struct.pack("!HHHH", 4000, 5000, 8 + len(payload), 0) + payload
    return push_ipv6_header(ipaddress.IPv6Address(src).packed, ipaddress.IPv6Address(dst).packed, 17, len(body)) + body


def test_ipv4_in_ipv6_both_ways_goes_to_the_emitter():
    a, emit_a = _engine("a")
    b, emit_b = _engine("b")
    packet = _udp4(A4, B4)
    assert a.process_outbound(packet, 1.0) is EMITTED  # the adapter drops the IPv4 original
    (esp,) = emit_a.packets
    assert esp[0] >> 4 == 6 and esp[6] == 50 and esp[8:24] == ipaddress.IPv6Address(A6).packed  # IPv6 ESP
    assert b.process_inbound(esp, 1.0) is EMITTED  # ... and the IPv6 ESP at the other end
    assert emit_b.packets == [packet]  # the inner IPv4 packet, as it was sent
    reply = _udp4(B4, A4)
    assert b.process_outbound(reply, 1.0) is EMITTED
    assert a.process_inbound(emit_b.packets[-1], 1.0) is EMITTED and emit_a.packets[-1] == reply
    assert not EMITTED and EMITTED.reason is DropReason.CROSS_FAMILY


def test_same_family_results_pass_the_wrapper_untouched():
    a, emitter = _engine("a")
    b, _ = _engine("b")
    six = _udp6(A6, "2001:db8:c::50")
    esp = a.process_outbound(six, 1.0)
    assert isinstance(esp, bytes) and esp[6] == 50  # IPv6 in IPv6: NFQUEUE carries it
    assert b.process_inbound(esp, 1.0) == six
    other = _udp4("10.0.0.1", "10.0.0.2")  # no policy: bypass, the very same object
    assert a.process_outbound(other, 1.0) is other
    bad = b"\x45" + bytes(10)
    assert isinstance(a.process_outbound(bad, 1.0), Drop)  # the engine's own drops stay its own
    assert emitter.packets == []


def test_the_wrapper_delegates_and_reports_what_it_emitted():
    a, _ = _engine("a")
    a.process_outbound(_udp4(A4, B4), 1.0)
    st = a.status()
    assert st["emitted"] == {"mark": f"{EMITTED_MARK:#x}", "sent": {"ipv4": 0, "ipv6": 1}, "errors": {}}
    assert {s["spi"] for s in st["sas"]} == {0x1007, 0x1008}
    assert a.next_timer() is None and a.query_inbound_spi(0x1008)["mode"] == "tunnel"


def test_through_the_unchanged_nfqueue_callback_the_original_is_dropped():
    a, emitter = _engine("a")
    counts, verdicts = [0, 0, 0, 0], []

    class Pkt:
        id = 1

        def get_payload(self) -> bytes:
            return _udp4(A4, B4)

    callback, _ = make_callback(a.process_outbound, counts, Tracer(), 0, lambda exc, q: None,
                                verdict=lambda pkt, v, payload: verdicts.append((v, payload)))
    callback(Pkt())
    assert verdicts == [(NF_DROP, None)] and counts[DROPPED] == 1 and len(emitter.packets) == 1


def test_other_version_and_an_emitter_that_cannot_send():
    assert other_version(b"\x45", b"\x60") and not other_version(b"\x60", b"\x6f")
    emitter = CrossFamilyEmitter()
    assert not emitter.emit(b"\x10garbage") and not emitter.emit(b"\x45short")
    assert emitter.errors == {"not-ip": 2} and emitter.sent == {"ipv4": 0, "ipv6": 0}
    emitter.close()


def test_engine_rules_return_on_the_emitted_mark_first():
    class Cfg:
        rules = RuleSettings()

        class queues:  # noqa: N801
            outbound, inbound = (0,), (1,)

    for family in (IPV4, IPV6):
        out, inn = chain_rules(Cfg, family, HOOK_OUT), chain_rules(Cfg, family, HOOK_IN)
        assert out[1] == "-A MIPBITS-OUT -m mark --mark 0x400000/0x400000 -j RETURN"  # after "-o lo"
        assert inn[1] == "-A MIPBITS-IN -m mark --mark 0x400000/0x400000 -j RETURN"
    Cfg.rules = RuleSettings(emitted_mark=0)
    assert not any("mark" in r for r in chain_rules(Cfg, IPV4, HOOK_OUT))
