"""Shared helpers for the ESP tests (SA pairs, packets, finding ESP) and checks of the helpers."""

from __future__ import annotations

import dataclasses
import ipaddress
import os

from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import HAO, MIP6MH_BU, IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrRouting
from scapy.packet import Raw

from bits.constants import AuthAlg, Direction, EncAlg, Mode
from bits.esp import SecurityAssociation
from bits.sa import Lifetime, SaParams
from bits.seqstore import MemorySeqReserver, sa_fingerprint

A6 = ipaddress.ip_address("2001:db8:1::10")  # our side
B6 = ipaddress.ip_address("2001:db8:2::1")  # peer
A4 = ipaddress.ip_address("198.51.100.10")
B4 = ipaddress.ip_address("203.0.113.1")
HOA = "2001:db8:77::5"

#: name -> (enc, enc_key, auth, auth_key, scapy crypt_algo, scapy auth_algo)
TRANSFORMS = {
    "gcm128": (EncAlg.AES_GCM_16, bytes(range(16)) + b"SALT", AuthAlg.NONE, b"", "AES-GCM", "NULL"),
    "gcm256": (EncAlg.AES_GCM_16, bytes(range(32)) + b"salt", AuthAlg.NONE, b"", "AES-GCM", "NULL"),
    "cbc": (EncAlg.AES_CBC, bytes(range(100, 116)), AuthAlg.HMAC_SHA256_128, bytes(range(32, 64)),
            "AES-CBC", "SHA2-256-128"),
    "null": (EncAlg.NULL, b"", AuthAlg.HMAC_SHA256_128, bytes(range(64, 96)), "NULL",
             "SHA2-256-128"),
    "chacha": (EncAlg.CHACHA20_POLY1305, bytes(range(200, 232)) + b"chch", AuthAlg.NONE, b"",
               "CHACHA20-POLY1305", "NULL"),
}

#: mode name -> (Mode, outer/SA address family, inner packet family)
MODES = {
    "transport4": (Mode.TRANSPORT, 4, 4),
    "transport6": (Mode.TRANSPORT, 6, 6),
    "transport6-mip": (Mode.TRANSPORT, 6, 6),  # type 2 routing header + Home Address option
    "tunnel6in6": (Mode.TUNNEL, 6, 6),
    "tunnel4in6": (Mode.TUNNEL, 6, 4),
    "tunnel6in4": (Mode.TUNNEL, 4, 6),
    "tunnel4in4": (Mode.TUNNEL, 4, 4),
}


def sa_params(
    transform: str = "gcm128",
    mode: str = "tunnel6in6",
    *,
    direction: Direction = Direction.OUT,
    esn: bool = False,
    window: int = 64,
    spi: int = 0x1001,
    soft: Lifetime = Lifetime(),
    hard: Lifetime = Lifetime(),
) -> SaParams:
    enc, key, auth, akey, _, _ = TRANSFORMS[transform]
    m, family, _ = MODES[mode]
    src, dst = (A6, B6) if family == 6 else (A4, B4)
    return SaParams(spi, src, dst, direction, m, enc, key, auth, akey, esn, window, soft, hard)


def sa_pair(
    transform: str = "gcm128",
    mode: str = "tunnel6in6",
    *,
    start_seq: int = 0,
    rand=os.urandom,
    now: float = 0.0,
    **kw,
) -> tuple[SecurityAssociation, SecurityAssociation]:
    """(outbound, inbound) SAs with the same keys; the outbound one sends ``start_seq`` + 1 next."""
    out_p = sa_params(transform, mode, **kw)
    reserver = MemorySeqReserver({sa_fingerprint(out_p): start_seq})
    out = SecurityAssociation(out_p, rand=rand, reserver=reserver, now=now)
    in_p = dataclasses.replace(out_p, direction=Direction.IN)
    inb = SecurityAssociation(in_p, rand=rand, now=now)
    return out, inb


def inner_packet(mode: str, payload: bytes = b"hello, esp") -> bytes:
    """A plausible packet for ``mode``: what the kernel hands the engine before protection."""
    _, family, inner = MODES[mode]
    if mode == "transport6-mip":
        # a Mobility Header behind a type 2 routing header and a Home Address option (both appear
        # in route-optimised traffic, RFC 6275 6.3/6.4): IPv6 | RH2(HoA) | DestOpt(HAO) | MH
        pkt = (
            IPv6(src=str(A6), dst=str(B6))
            / IPv6ExtHdrRouting(type=2, addresses=[HOA], segleft=1)
            / IPv6ExtHdrDestOpt(options=[HAO(hoa=HOA)])
            / MIP6MH_BU(seq=7, flags=0x5000, mhtime=300)
        )
        return bytes(pkt)
    if mode.startswith("transport"):
        src, dst = (A6, B6) if family == 6 else (A4, B4)
    else:
        inner6 = ("2001:db8:aaaa::1", "2001:db8:bbbb::2")
        src, dst = inner6 if inner == 6 else ("10.1.0.1", "10.2.0.2")
    if inner == 6:
        ip = IPv6(src=str(src), dst=str(dst), tc=0xB9, fl=0x12345)
    else:
        ip = IP(src=str(src), dst=str(dst), tos=0xB9, flags="DF", id=777)
    return bytes(ip / UDP(sport=1234, dport=5678) / Raw(payload))


def find_esp(packet: bytes) -> int:
    """Offset of the ESP header: what the engine computes before calling decapsulate."""
    if packet[0] >> 4 == 4:
        assert packet[9] == 50
        return (packet[0] & 0x0F) * 4
    nh, off = packet[6], 40
    while nh != 50:
        assert nh in (0, 43, 44, 60), f"no ESP: next header {nh}"
        length = 8 if nh == 44 else (packet[off + 1] + 1) * 8
        nh, off = packet[off], off + length
    return off


def test_find_esp_walks_extension_headers() -> None:
    pkt = bytes(
        IPv6(src=str(A6), dst=str(B6)) / IPv6ExtHdrRouting(type=2, addresses=[HOA], segleft=1)
        / IPv6ExtHdrDestOpt(options=[HAO(hoa=HOA)], nh=50) / Raw(bytes(16))
    )
    assert find_esp(pkt) == 40 + 24 + 24


def test_inner_packets_are_what_the_modes_say() -> None:
    for mode, (_, family, inner) in MODES.items():
        pkt = inner_packet(mode)
        assert pkt[0] >> 4 == inner, mode
