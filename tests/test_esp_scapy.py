"""scapy's ``SecurityAssociation`` as an independent oracle: it opens what we send and we open what
it sends, for every transform and mode (scapy is test-only; the engine never imports it)."""

from __future__ import annotations

import pytest
from scapy.layers.inet import IP
from scapy.layers.inet6 import IPv6
from scapy.layers.ipsec import ESP
from scapy.layers.ipsec import SecurityAssociation as ScapySA

from bits.verdict import Drop

from .test_esp_support import A4, A6, B4, B6, MODES, TRANSFORMS, find_esp, inner_packet, sa_pair


def scapy_sa(transform: str, mode: str, *, esn: bool = False, esn_hi: int = 0) -> ScapySA:
    _, key, _, akey, crypt, auth = TRANSFORMS[transform]
    _, family, _ = MODES[mode]
    tunnel = None
    if mode.startswith("tunnel"):
        tunnel = IPv6(src=str(A6), dst=str(B6)) if family == 6 else IP(src=str(A4), dst=str(B4))
    return ScapySA(
        ESP, spi=0x1001, crypt_algo=crypt, crypt_key=key, auth_algo=auth, auth_key=akey or None,
        tunnel_header=tunnel, esn_en=esn, esn=esn_hi,
    )


def parse(packet: bytes):
    return IPv6(packet) if packet[0] >> 4 == 6 else IP(packet)


CASES = [(t, m) for t in TRANSFORMS for m in MODES]


@pytest.mark.parametrize("transform,mode", CASES)
def test_scapy_opens_what_we_send(transform: str, mode: str) -> None:
    out, _ = sa_pair(transform, mode)
    oracle = scapy_sa(transform, mode)
    for payload in (b"", b"x", b"hello, esp" * 30):
        original = inner_packet(mode, payload)
        pkt = out.encapsulate(original, 0.0)
        assert isinstance(pkt, bytes)
        opened = oracle.decrypt(parse(pkt))  # verifies the ICV / tag, raises if it does not
        assert bytes(opened) == original


@pytest.mark.parametrize("transform,mode", CASES)
def test_we_open_what_scapy_sends(transform: str, mode: str) -> None:
    _, inb = sa_pair(transform, mode)
    oracle = scapy_sa(transform, mode)
    for seq, payload in enumerate((b"", b"x", b"hello, esp" * 30), start=1):
        original = inner_packet(mode, payload)
        pkt = bytes(oracle.encrypt(parse(original), seq_num=seq))
        result = inb.decapsulate(pkt, find_esp(pkt), 0.0)
        assert not isinstance(result, Drop), result
        assert result == original


def test_scapy_places_esp_between_rh2_and_hao_and_we_still_open_it() -> None:
    """scapy (like Linux) inserts transport ESP before a destination options header that follows
    the routing header; we keep the HAO in front (RFC 6275 6.3). Both placements must decapsulate
    to the same packet."""
    original = inner_packet("transport6-mip")
    pkt = bytes(scapy_sa("gcm128", "transport6-mip").encrypt(IPv6(original), seq_num=1))
    assert find_esp(pkt) == 40 + 24
    _, inb = sa_pair("gcm128", "transport6-mip")
    assert inb.decapsulate(pkt, 64, 0.0) == original


@pytest.mark.parametrize("transform", list(TRANSFORMS))
def test_esn_interop_both_ways(transform: str) -> None:
    """ESN across 2^32: scapy needs the high half given; we infer it (RFC 4303 Appendix A)."""
    mode = "tunnel6in6"
    out, inb = sa_pair(transform, mode, start_seq=2**32 + 4, esn=True)
    original = inner_packet(mode)
    pkt = out.encapsulate(original, 0.0)
    assert isinstance(pkt, bytes)
    assert bytes(scapy_sa(transform, mode, esn=True, esn_hi=1).decrypt(IPv6(pkt))) == original
    inb.replay.commit(2**32 + 1)
    theirs = bytes(scapy_sa(transform, mode, esn=True, esn_hi=1).encrypt(IPv6(original), seq_num=9))
    assert inb.decapsulate(theirs, 40, 0.0) == original
    assert inb.replay.top == 2**32 + 9
