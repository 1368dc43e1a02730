"""Whole-packet known answers: RFC 7634 Appendix A and RFC 3602 section 4 cases 5-8."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import ipaddress
import struct

import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from bits.constants import AuthAlg, Direction, EncAlg, Mode
from bits.esp import SecurityAssociation, peek_spi_seq
from bits.ip import ipv4_checksum, push_ipv4_header
from bits.sa import SaParams
from bits.seqstore import MemorySeqReserver, sa_fingerprint
from bits.transforms import trailer

h = bytes.fromhex


def unhex(text: str) -> bytes:
    return bytes.fromhex("".join(text.split()))


def ipv4_header(header: bytes, *, total: int, ident: int | None = None) -> bytes:
    """``header`` with a new Total Length (and Identification), checksum recomputed."""
    hdr = bytearray(header)
    hdr[2:4] = struct.pack("!H", total)
    if ident is not None:
        hdr[4:6] = struct.pack("!H", ident)
    hdr[10:12] = b"\0\0"
    hdr[10:12] = struct.pack("!H", ipv4_checksum(bytes(hdr)))
    return bytes(hdr)


def outbound(params: SaParams, next_seq: int, iv: bytes = b"") -> SecurityAssociation:
    """An SA whose next packet uses ``next_seq`` (via the reservation store) and whose rand()
    returns ``iv`` (the AES-CBC IV source)."""
    reserver = MemorySeqReserver({sa_fingerprint(params): next_seq - 1})
    return SecurityAssociation(params, rand=lambda n: iv[:n], reserver=reserver, now=0.0)


# --- RFC 7634 Appendix A: tunnel-mode ESP with ChaCha20-Poly1305 ----------------------------

RFC7634_KEYMAT = unhex("""
    80 81 82 83 84 85 86 87 88 89 8a 8b 8c 8d 8e 8f 90 91 92 93 94 95 96 97 98 99 9a 9b 9c 9d 9e 9f
    a0 a1 a2 a3""")
RFC7634_SOURCE = unhex("""
    45 00 00 54 a6 f2 00 00 40 01 e7 78 c6 33 64 05 c0 00 02 05 08 00 5b 7a 3a 08 00 00 55 3b ec 10
    00 07 36 27 08 09 0a 0b 0c 0d 0e 0f 10 11 12 13 14 15 16 17 18 19 1a 1b 1c 1d 1e 1f 20 21 22 23
    24 25 26 27 28 29 2a 2b 2c 2d 2e 2f 30 31 32 33 34 35 36 37""")
RFC7634_ESP_PACKET = unhex("""
    45 00 00 8c 23 45 00 00 40 32 de 5b cb 00 71 99 cb 00 71 05 01 02 03 04 00 00 00 05 10 11 12 13
    14 15 16 17 24 03 94 28 b9 7f 41 7e 3c 13 75 3a 4f 05 08 7b 67 c3 52 e6 a7 fa b1 b9 82 d4 66 ef
    40 7a e5 c6 14 ee 80 99 d5 28 44 eb 61 aa 95 df ab 4c 02 f7 2a a7 1e 7c 4c 4f 64 c9 be fe 2f ac
    c6 38 e8 f3 cb ec 16 3f ac 46 9b 50 27 73 f6 fb 94 e6 64 da 91 65 b8 28 29 f6 41 e0 76 aa a8 26
    6b 7f b0 f7 b1 1b 36 99 07 e1 ad 43""")
RFC7634_PARAMS = SaParams(
    0x01020304, ipaddress.ip_address("203.0.113.153"), ipaddress.ip_address("203.0.113.5"),
    Direction.OUT, Mode.TUNNEL, EncAlg.CHACHA20_POLY1305, RFC7634_KEYMAT,
)


def test_rfc7634_appendix_a_byte_for_byte() -> None:
    """The example's IV (0x1011121314151617) is not its sequence number, so the packet is put
    together from the SA's transform with the IV injected and the example's IPv4 ident 0x2345."""
    sa = outbound(RFC7634_PARAMS, 5)
    t = sa.transform
    plaintext = RFC7634_SOURCE + trailer(t, len(RFC7634_SOURCE), 4)
    assert plaintext[-4:] == h("01020204")  # "Plaintext (includes padding and pad length)"
    esp = t.seal_with_iv(0x01020304, 5, h("1011121314151617"), plaintext)
    src, dst = RFC7634_PARAMS.src.packed, RFC7634_PARAMS.dst.packed
    outer = push_ipv4_header(src, dst, 50, 20 + len(esp), ident=0x2345)
    assert outer + esp == RFC7634_ESP_PACKET


def test_rfc7634_appendix_a_through_the_sa() -> None:
    """Our SA sends sequence number 5 with IV = 5 (our nonce rule); everything else is the example,
    and a receiving SA opens the published packet as it stands."""
    sa = outbound(RFC7634_PARAMS, 5)
    pkt = sa.encapsulate(RFC7634_SOURCE, 0.0)
    assert isinstance(pkt, bytes)
    assert len(pkt) == len(RFC7634_ESP_PACKET)
    # only the Identification and so the checksum differ in the outer header
    assert pkt[:4] == RFC7634_ESP_PACKET[:4] and pkt[6:10] == RFC7634_ESP_PACKET[6:10]
    assert pkt[12:20] == RFC7634_ESP_PACKET[12:20] and ipv4_checksum(pkt[:20]) == 0
    assert peek_spi_seq(pkt, 20) == (0x01020304, 5)
    iv = pkt[28:36]
    assert iv == (5).to_bytes(8, "big")
    key, salt = RFC7634_KEYMAT[:32], RFC7634_KEYMAT[32:]
    opened = ChaCha20Poly1305(key).decrypt(salt + iv, pkt[36:], pkt[20:28])
    assert opened == RFC7634_SOURCE + h("01020204")
    peer_params = dataclasses.replace(RFC7634_PARAMS, direction=Direction.IN)
    peer = SecurityAssociation(peer_params, rand=bytes, now=0.0)
    assert peer.decapsulate(RFC7634_ESP_PACKET, 20, 0.0) == RFC7634_SOURCE


# --- RFC 3602 section 4, cases 5-8: ESP packets with AES-CBC -------------------------------------
# The RFC's packets carry no ICV (they illustrate encryption only). Our SA always adds
# HMAC-SHA-256-128, so the expected packet is the RFC's with Total Length + 16 and an ICV computed
# over its ESP part; in tunnel mode our outer Identification is the sequence number.

AUTH_KEY = bytes(range(0xC0, 0xE0))

RFC3602_ESP = [
    dict(
        case=5, mode=Mode.TRANSPORT, key="90d382b4 10eeba7a d938c46c ec1a82bf", spi=0x4321,
        src="192.168.123.3", dst="192.168.123.100", seq=1, iv="e96e8c08 ab465763 fd098d45 dd3ff893",
        original="""45000054 08f20000 4001f9fe c0a87b03 c0a87b64
            08000ebd a70a0000 8e9c083d b95b0700 08090a0b 0c0d0e0f 10111213 14151617
            18191a1b 1c1d1e1f 20212223 24252627 28292a2b 2c2d2e2f 30313233 34353637""",
        header="4500007c 08f20000 4032f9a5 c0a87b03 c0a87b64",
        encrypted="""f663c25d 325c18c6 a9453e19 4e120849 a4870b66 cc6b9965 330013b4 898dc856
            a4699e52 3a55db08 0b59ec3a 8e4b7e52 775b07d1 db34ed9c 538ab50c 551b874a
            a269add0 47ad2d59 13ac19b7 cfbad4a6""",
    ),
    dict(
        case=6, mode=Mode.TRANSPORT, key="90d382b4 10eeba7a d938c46c ec1a82bf", spi=0x4321,
        src="192.168.123.3", dst="192.168.123.100", seq=8, iv="69d08df7 d203329d b093fc49 24e5bd80",
        original="""45000030 08fe0000 4001fa16 c0a87b03 c0a87b64
            0800b5e8 a80a0500 a69c083d 0b660e00 77777777 77777777 77777777""",
        header="4500004c 08fe0000 4032f9c9 c0a87b03 c0a87b64",
        encrypted="""f5199588 1ec4e0c4 488987ce 742e8109 689bb379 d2d750c0 d915dca3 46a89f75""",
    ),
    dict(
        case=7, mode=Mode.TUNNEL, key="01234567 89abcdef 01234567 89abcdef", spi=0x8765,
        src="192.168.123.3", dst="192.168.123.200", seq=2, iv="f4e76524 4f6407ad f13dc138 0f673f37",
        original="""45000054 09040000 4001f988 c0a87b03 c0a87bc8
            08009f76 a90a0100 b49c083d 02a20400 08090a0b 0c0d0e0f 10111213 14151617
            18191a1b 1c1d1e1f 20212223 24252627 28292a2b 2c2d2e2f 30313233 34353637""",
        header="4500008c 09050000 4032f91e c0a87b03 c0a87bc8",
        encrypted="""773b5241 a4c44922 5e4f3ce5 ed611b0c 237ca96c f74a9301 3c1b0ea1 a0cf70f8
            e4ecaec7 8ac53aad 7a0f022b 859243c6 47752e94 a859352b 8a4d4d2d ecd136e5
            c177f132 ad3fbfb2 201ac990 4c74ee0a 109e0ca1 e4dfe9d5 a100b842 f1c22f0d""",
    ),
    dict(
        case=8, mode=Mode.TUNNEL, key="01234567 89abcdef 01234567 89abcdef", spi=0x8765,
        src="192.168.123.3", dst="192.168.123.200", seq=5, iv="85d47224 b5f3dd5d 2101d4ea 8dffab22",
        original="""45000044 090c0000 4001f990 c0a87b03 c0a87bc8
            0800d63c aa0a0200 c69c083d a3de0300 ffffffff ffffffff ffffffff ffffffff
            ffffffff ffffffff ffffffff ffffffff""",
        header="4500007c 090d0000 4032f926 c0a87b03 c0a87bc8",
        encrypted="""15b92683 819596a8 047232cc 00f7048f e45318e1 1f8a0f62 ede3c3fc 61203bb5
            0f980a08 c9843fd3 a1b06d5c 07ff9639 b7eb7dfb 3512e5de 435e7207 ed971ef3
            d2726d9b 5ef6affc 6d17a0de cbb13892""",
    ),
]


def rfc3602_params(v: dict) -> SaParams:
    return SaParams(
        v["spi"], ipaddress.ip_address(v["src"]), ipaddress.ip_address(v["dst"]), Direction.OUT,
        v["mode"], EncAlg.AES_CBC, unhex(v["key"]), AuthAlg.HMAC_SHA256_128, AUTH_KEY,
    )


def rfc3602_expected(v: dict) -> bytes:
    esp = struct.pack("!II", v["spi"], v["seq"]) + unhex(v["iv"]) + unhex(v["encrypted"])
    icv = hmac.new(AUTH_KEY, esp, hashlib.sha256).digest()[:16]
    header = unhex(v["header"])
    ident = v["seq"] if v["mode"] is Mode.TUNNEL else None
    return ipv4_header(header, total=20 + len(esp) + 16, ident=ident) + esp + icv


@pytest.mark.parametrize("v", RFC3602_ESP, ids=[f"case{v['case']}" for v in RFC3602_ESP])
def test_rfc3602_esp_packets_encapsulate(v: dict) -> None:
    sa = outbound(rfc3602_params(v), v["seq"], unhex(v["iv"]))
    pkt = sa.encapsulate(unhex(v["original"]), 0.0)
    assert pkt == rfc3602_expected(v)


@pytest.mark.parametrize("v", RFC3602_ESP, ids=[f"case{v['case']}" for v in RFC3602_ESP])
def test_rfc3602_esp_packets_decapsulate(v: dict) -> None:
    params = dataclasses.replace(rfc3602_params(v), direction=Direction.IN)
    sa = SecurityAssociation(params, rand=bytes, now=0.0)
    assert sa.decapsulate(rfc3602_expected(v), 20, 0.0) == unhex(v["original"])
