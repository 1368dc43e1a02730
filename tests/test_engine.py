"""The engine end to end in memory: node A's outbound feeds node B's inbound (and back)."""

from __future__ import annotations

import os

import pytest
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6

from bits.constants import IpProto
from bits.engine import Engine, build_engine
from bits.ip import pull_ip, pull_selectors
from bits.setkey import parse_setkey
from bits.trace import Tracer
from bits.verdict import Drop, DropReason

A6, B6, C6 = "2001:db8:a::1", "2001:db8:b::1", "2001:db8:c::1"
A4, B4 = "192.0.2.1", "192.0.2.2"
K1 = "0x" + "11" * 16 + "a1a2a3a4"
K2 = "0x" + "22" * 16 + "b1b2b3b4"
K3 = "0x" + "33" * 16 + "c1c2c3c4"
K4 = "0x" + "44" * 16 + "d1d2d3d4"

SAS = f"""
add {A6} {B6} esp 0x1001 -m transport -E aes-gcm-16 {K1};
add {B6} {A6} esp 0x1002 -m transport -E aes-gcm-16 {K2};
add {A4} {B4} esp 0x1003 -m tunnel -E aes-gcm-16 {K3};
add {B4} {A4} esp 0x1004 -m tunnel -E aes-gcm-16 {K4};
"""


def _policies(me: str, peer: str, me4: str, peer4: str) -> str:
    return f"""
spdadd {me} {peer} udp -P out ipsec esp/transport//require;
spdadd {peer} {me} udp -P in ipsec esp/transport//require;
spdadd {me} {peer} icmp6 -P out none;
spdadd {peer} {me} icmp6 -P in none;
spdadd {me4} {peer4} any -P out ipsec esp/tunnel/{me4}-{peer4}/require;
spdadd {peer4} {me4} any -P in ipsec esp/tunnel/{peer4}-{me4}/require;
"""


def _node(me: str, peer: str, me4: str, peer4: str, tracer: Tracer | None = None) -> Engine:
    cfg = parse_setkey(SAS + _policies(me, peer, me4, peer4), local_addresses=[me, me4])
    return build_engine(cfg, rand=os.urandom, now=0.0, tracer=tracer)


@pytest.fixture()
def pair() -> tuple[Engine, Engine]:
    return _node(A6, B6, A4, B4), _node(B6, A6, B4, A4)


def test_transport_v6_round_trip(pair):
    a, b = pair
    pkt = bytes(IPv6(src=A6, dst=B6) / UDP(sport=1000, dport=2000) / b"hello")
    wire = a.process_outbound(pkt, 1.0)
    assert isinstance(wire, bytes) and wire != pkt
    assert pull_ip(wire).proto == IpProto.ESP
    assert b"hello" not in wire
    assert b.process_inbound(wire, 1.0) == pkt
    assert a.counts["out_protected"] == 1 and b.counts["in_decapsulated"] == 1


def test_tunnel_v4_round_trip_and_reply(pair):
    a, b = pair
    pkt = bytes(IP(src=A4, dst=B4) / ICMP() / b"ping")
    wire = a.process_outbound(pkt, 1.0)
    outer = IP(wire)
    assert outer.proto == 50 and outer.src == A4 and outer.dst == B4
    assert b.process_inbound(wire, 1.0) == pkt
    reply = bytes(IP(src=B4, dst=A4) / ICMP(type=0) / b"pong")
    assert a.process_inbound(b.process_outbound(reply, 1.0), 1.0) == reply


def test_bypass_returns_same_object(pair):
    a, b = pair
    pkt = bytes(IPv6(src=A6, dst=B6) / ICMPv6EchoRequest())
    assert a.process_outbound(pkt, 1.0) is pkt
    assert b.process_inbound(pkt, 1.0) is pkt


def test_default_discard_and_cleartext_protected(pair):
    a, b = pair
    other = bytes(IPv6(src=A6, dst=C6) / UDP(sport=1, dport=2))
    d = a.process_outbound(other, 1.0)
    assert isinstance(d, Drop) and d.reason is DropReason.DISCARD_POLICY
    clear = bytes(IPv6(src=A6, dst=B6) / UDP(sport=1000, dport=2000) / b"x")
    d = b.process_inbound(clear, 1.0)
    assert isinstance(d, Drop) and d.reason is DropReason.CLEARTEXT_PROTECTED
    assert b.drops[DropReason.CLEARTEXT_PROTECTED] == 1


def test_replay_and_forgery_are_counted_drops(pair):
    a, b = pair
    wire = a.process_outbound(bytes(IPv6(src=A6, dst=B6) / UDP(sport=1, dport=2) / b"x"), 1.0)
    assert isinstance(b.process_inbound(wire, 1.0), bytes)
    d = b.process_inbound(wire, 1.0)
    assert isinstance(d, Drop) and d.reason is DropReason.REPLAY
    forged = bytearray(a.process_outbound(bytes(IPv6(src=A6, dst=B6) / UDP(sport=1, dport=2) / b"y"), 1.0))
    forged[-1] ^= 1
    d = b.process_inbound(bytes(forged), 1.0)
    assert isinstance(d, Drop) and d.reason is DropReason.AUTH_FAILED
    st = {s["spi"]: s for s in b.status()["sas"]}[0x1001]
    assert st["replay_drops"] == 1 and st["auth_failures"] == 1
    assert b.status()["drops"] == {"replay": 1, "auth-failed": 1}


def test_unknown_spi_and_garbage(pair):
    a, b = pair
    wire = bytearray(a.process_outbound(bytes(IPv6(src=A6, dst=B6) / UDP(sport=1, dport=2)), 1.0))
    wire[40:44] = b"\x00\x00\x99\x99"
    d = b.process_inbound(bytes(wire), 1.0)
    assert isinstance(d, Drop) and d.reason is DropReason.UNKNOWN_SPI
    for junk in (b"", b"\x60", b"\x45\x00", os.urandom(3), bytes(wire[:45])):
        assert isinstance(b.process_inbound(junk, 1.0), Drop)
        assert isinstance(b.process_outbound(junk, 1.0), Drop)


def test_selector_mismatch_inside_tunnel(pair):
    """A packet decrypted from the A4<->B4 tunnel SA must match that SA's inbound policy."""
    a, b = pair
    sa = a.policy.sad.get_outbound(0x1003)
    spoofed = bytes(IP(src="198.51.100.7", dst=B4) / UDP(sport=1, dport=2))
    wire = sa.encapsulate(spoofed, 1.0)
    d = b.process_inbound(wire, 1.0)
    assert isinstance(d, Drop) and d.reason is DropReason.SELECTOR_MISMATCH


def test_trace_records_decisions(pair):
    records: list[dict] = []
    a = _node(A6, B6, A4, B4, Tracer(records.append, "all", component="esp"))
    b = pair[1]
    pkt = bytes(IPv6(src=A6, dst=B6) / UDP(sport=1, dport=2) / b"x")
    a.process_outbound(pkt, 1.0)
    a.process_inbound(bytes(IPv6(src=B6, dst=A6) / UDP(sport=2, dport=1)), 1.0)  # must be ESP
    events = [(r["event"], r.get("reason")) for r in records]
    assert events == [("encap", None), ("drop", "cleartext-protected")]
    assert records[0]["spi"] == 0x1001 and records[0]["inner_src"] == A6


def test_query_interface(pair):
    a, b = pair
    sel = pull_selectors(bytes(IPv6(src=A6, dst=B6) / UDP(sport=5, dport=6)))
    ans = a.query_outbound(sel)
    assert ans["spi"] == 0x1001
    inb = b.query_inbound_spi(0x1001)
    assert inb is not None and inb["mode"] == "transport"
    assert b.query_inbound_spi(0xDEAD) is None


def test_use_level_sends_clear_without_sa_and_accepts_clear():
    conf = f"""
spdadd {A6} {C6} udp -P out ipsec esp/transport//use;
spdadd {C6} {A6} udp -P in ipsec esp/transport//use;
"""
    eng = build_engine(parse_setkey(conf, local_addresses=[A6]), rand=os.urandom, now=0.0)
    out = bytes(IPv6(src=A6, dst=C6) / UDP(sport=1, dport=2))
    assert eng.process_outbound(out, 1.0) is out
    back = bytes(IPv6(src=C6, dst=A6) / UDP(sport=2, dport=1))
    assert eng.process_inbound(back, 1.0) is back


def test_reconfigure_keeps_state_of_unchanged_sas(pair):
    a, b = pair
    pkt = bytes(IPv6(src=A6, dst=B6) / UDP(sport=1, dport=2) / b"x")
    for _ in range(3):
        b.process_inbound(a.process_outbound(pkt, 1.0), 1.0)
    kept = a.policy.sad.get_outbound(0x1001)
    changed = SAS.replace(K3, "0x" + "77" * 16 + "c1c2c3c4")  # SA 0x1003 gets a new key
    a.reconfigure(parse_setkey(changed + _policies(A6, B6, A4, B4), local_addresses=[A6, A4]),
                  rand=os.urandom, now=2.0)
    assert a.policy.sad.get_outbound(0x1001) is kept and kept.seq == 3
    assert a.policy.sad.get_outbound(0x1003).seq == 0
    wire = a.process_outbound(pkt, 2.0)
    assert b.process_inbound(wire, 2.0) == pkt  # seq 4 continues; the peer's window accepts it
