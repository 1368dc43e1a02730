"""Known answers for bits/transforms.py: RFC 3602, 4868, 7634 and draft-mcgrew-gcm-test-01."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import struct

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from bits.constants import AuthAlg, Direction, EncAlg, Mode
from bits.errors import ConfigError
from bits.sa import SaParams
from bits.transforms import make_transform, trailer

A = ipaddress.ip_address("192.0.2.1")
B = ipaddress.ip_address("192.0.2.2")


def params(enc: EncAlg, key: bytes, auth: AuthAlg = AuthAlg.NONE, akey: bytes = b"", esn=False):
    return SaParams(0x1001, A, B, Direction.OUT, Mode.TUNNEL, enc, key, auth, akey, esn)


def cbc(key: bytes, akey: bytes = bytes(32), esn: bool = False):
    p = params(EncAlg.AES_CBC, key, AuthAlg.HMAC_SHA256_128, akey, esn)
    return make_transform(p, os.urandom)


def gcm(key_salt: bytes, esn: bool = False):
    return make_transform(params(EncAlg.AES_GCM_16, key_salt, esn=esn), os.urandom)


def null(akey: bytes, esn: bool = False):
    return make_transform(params(EncAlg.NULL, b"", AuthAlg.HMAC_SHA256_128, akey, esn), os.urandom)


h = bytes.fromhex

# --- RFC 3602 section 4, cases 1-4: AES-CBC with a 128-bit key -----------------------------

RFC3602_CBC = [
    # (case, key, IV, plaintext, ciphertext)
    (1, "06a9214036b8a15b512e03d534120006", "3dafba429d9eb430b422da802c9fac41",
     b"Single block msg".hex(), "e353779c1079aeb82708942dbe77181a"),
    (2, "c286696d887c9aa0611bbb3e2025a45a", "562e17996d093d28ddb3ba695a2e6f58",
     "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f",
     "d296cd94c2cccf8a3a863028b5e1dc0a7586602d253cfff91b8266bea6d61ab1"),
    (3, "6c3ea0477630ce21a2ce334aa746c2cd", "c782dc4c098c66cbd9cd27d825682c81",
     b"This is a 48-byte message (exactly 3 AES blocks)".hex(),
     "d0a02b3836451753d493665d33f0e8862dea54cdb293abc7506939276772f8d5"
     "021c19216bad525c8579695d83ba2684"),
    (4, "56e47a38c5598974bc46903dba290349", "8ce82eefbea0da3c44699ed7db51b7d9",
     "a0a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3b4b5b6b7b8b9babbbcbdbebf"
     "c0c1c2c3c4c5c6c7c8c9cacbcccdcecfd0d1d2d3d4d5d6d7d8d9dadbdcdddedf",
     "c30e32ffedc0774e6aff6af0869f71aa0f3af07a9a31a9c684db207eb0ef8e4e"
     "35907aa632c3ffdf868bb7b29d3d46ad83ce9f9a102ee99d49a53e87f4c3da55"),
]


@pytest.mark.parametrize("case,key,iv,pt,ct", RFC3602_CBC, ids=[f"case{c[0]}" for c in RFC3602_CBC])
def test_rfc3602_cbc_vectors(case: int, key: str, iv: str, pt: str, ct: str) -> None:
    akey = bytes(range(32))
    t = cbc(h(key), akey)
    # the long-lived CBC contexts must give the same answer on every packet, not just the first
    for _ in range(3):
        esp = t.seal_with_iv(0x4321, 7, h(iv), h(pt))
        assert esp[:8] == struct.pack("!II", 0x4321, 7)
        assert esp[8:24] == h(iv)
        assert esp[24:-16].hex() == ct
        # encrypt-then-MAC: the ICV covers header, IV and ciphertext
        assert esp[-16:] == hmac.new(akey, esp[:-16], hashlib.sha256).digest()[:16]
        assert t.open(esp, 0, len(esp), 7) == h(pt)


def test_cbc_contexts_survive_interleaving() -> None:
    """Random packets between the vectors must not disturb the chaining-register trick."""
    t = cbc(h(RFC3602_CBC[1][1]))
    for _ in range(5):
        junk = t.seal(1, 1, os.urandom(64))
        assert t.open(junk, 0, len(junk), 1) is not None
        _, key, iv, pt, ct = RFC3602_CBC[1]
        esp = t.seal_with_iv(1, 2, h(iv), h(pt))
        assert esp[24:-16].hex() == ct
    # packets opened out of order and from another transform instance (the peer) still decrypt
    peer = cbc(h(RFC3602_CBC[1][1]))
    sent = [t.seal(1, i, os.urandom(32)) for i in range(1, 6)]
    for esp in reversed(sent):
        assert peer.open(esp, 0, len(esp), 0) is not None


def test_cbc_iv_comes_from_rand() -> None:
    ivs = iter([b"\x11" * 16, b"\x22" * 16])
    p = params(EncAlg.AES_CBC, bytes(16), AuthAlg.HMAC_SHA256_128, bytes(32))
    t = make_transform(p, lambda n: next(ivs))
    assert t.seal(1, 1, bytes(16))[8:24] == b"\x11" * 16
    assert t.seal(1, 2, bytes(16))[8:24] == b"\x22" * 16


def test_cbc_open_rejects_bad_mac_before_decrypting() -> None:
    t = cbc(bytes(16))
    esp = bytearray(t.seal(1, 1, bytes(32)))
    esp[30] ^= 1
    assert t.open(bytes(esp), 0, len(esp), 1) is None


# --- RFC 4868 section 2.7.2.1: HMAC-SHA-256-128 (through the NULL transform) ----------------

RFC4868_AUTH256 = [
    # (test case, key, data, HMAC-SHA-256-128); the first 8 data octets play SPI | Seq
    ("AUTH256-1", "0b" * 32, b"Hi There".hex(), "198a607eb44bfbc69903a0f1cf2bbdc5"),
    ("AUTH256-2", b"Jefe".hex() * 8, b"what do ya want for nothing?".hex(),
     "167f928588c5cc2eef8e3093caa0e87c"),
    ("AUTH256-3", "aa" * 32, "dd" * 50, "cdcb1220d1ecccea91e53aba3092f962"),
    ("AUTH256-4", "0102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f20", "cd" * 50,
     "372efcf9b40b35c2115b1346903d2ef4"),
]


@pytest.mark.parametrize("name,key,data,icv", RFC4868_AUTH256, ids=[v[0] for v in RFC4868_AUTH256])
def test_rfc4868_hmac_sha256_128(name: str, key: str, data: str, icv: str) -> None:
    t = null(h(key))
    spi, seq = struct.unpack("!II", h(data)[:8])
    esp = t.seal(spi, seq, h(data)[8:])
    assert esp == h(data) + h(icv)
    assert t.open(esp, 0, len(esp), seq) == h(data)[8:]


def test_esn_high_half_is_appended_to_the_mac_input_only() -> None:
    """RFC 4303 section 2.2.1: with ESN the ICV covers SPI | SeqL | ... | SeqH; SeqH is not sent."""
    akey = os.urandom(32)
    t = null(akey, esn=True)
    seq = (7 << 32) | 9
    esp = t.seal(0x1234, seq, b"abcd")
    assert esp[:8] == struct.pack("!II", 0x1234, 9)
    assert len(esp) == 8 + 4 + 16
    expected = hmac.new(akey, esp[:-16] + struct.pack("!I", 7), hashlib.sha256).digest()[:16]
    assert esp[-16:] == expected
    assert t.open(esp, 0, len(esp), seq) == b"abcd"
    assert t.open(esp, 0, len(esp), seq + (1 << 32)) is None  # wrong inferred high half fails


# --- draft-mcgrew-gcm-test-01 section 4: AES-GCM in ESP (RFC 4106) --------------------------

# (label, key, salt, SPI, full sequence number, ESN, IV, plaintext incl. trailer, ciphertext || tag)
MCGREW_GCM = [
    ("case1-aes128-esn", "4c80cdefbb5d10da906ac73c3613a634", "2e443b68", 0x4321,
     0x8765432100000000, True,
     "4956ed7e3b244cfe",
     "45000048699a000080114db7c0a80102c0a801010a9bf15638d301000001000000000000045f736970045f7564"
     "70037369700963796265726369747902646b000021000101020201",
     "fecf537e729d5b07dc30df528dd22b768d1b98736696a6fd348509fa13ceac34cfa2436f14a3f3cf65925bf1f4"
     "a13c5d15b21e1884f5ff6247aeabb786b93bce61bc17d768fd9732459018148f6cbe722fd04796562dfdb4"),
    ("case2-aes128", "feffe9928665731c6d6a8f9467308308", "cafebabe", 0xA5F8, 0x0A, False,
     "facedbaddecaf888",
     "4500003e698f000080114dccc0a80102c0a801010a980035002a2343b2d001000001000000000000037369700963"
     "796265726369747902646b00000100010001",
     "deb22cd9b07c72c16e3a65beeb8df304a5a5897d33ae530f1ba76d5d114d2a5c3de81827c10e9a4f51330d0eec41"
     "6642cfbb85a5b47e48a4ec3b9ba95d918bd183b70d3aa8bc6ee4c309e9d85a41ad4a"),
    ("case3-aes256", "abbccddef00112233445566778899aababbccddef00112233445566778899aab", "11223344",
     0x4A2CBFE3, 2, False, "0102030405060708",
     "4500003069a6400080062690c0a801029389155e0a9e008b2dc57ee0000000007002400020bf0000020405b401"
     "01040201020201",
     "ff425c9b724599df7a3bcd510194e00d6a78107f1b0b1cbf06efae9d65a5d763748a637985771d347f0545659f14"
     "e99def842d8eb335f4eecfdbf831824b4c4915956c96"),
]


@pytest.mark.parametrize(
    "label,key,salt,spi,seq,esn,iv,pt,ct", MCGREW_GCM, ids=[v[0] for v in MCGREW_GCM]
)
def test_gcm_esp_vectors(label, key, salt, spi, seq, esn, iv, pt, ct) -> None:
    t = gcm(h(key) + h(salt), esn=esn)
    esp = t.seal_with_iv(spi, seq, h(iv), h(pt))
    assert esp == struct.pack("!II", spi, seq & 0xFFFFFFFF) + h(iv) + h(ct)
    assert t.open(esp, 0, len(esp), seq) == h(pt)
    tampered = esp[:7] + bytes([esp[7] ^ 1]) + esp[8:]
    assert t.open(tampered, 0, len(tampered), seq ^ 1) is None  # the AAD binds the sequence number
    if esn:
        assert t.open(esp, 0, len(esp), seq + (1 << 32)) is None  # ... and its unsent high half


def test_gcm_iv_is_the_sequence_number_and_nonce_is_salt_iv() -> None:
    key, salt = os.urandom(16), os.urandom(4)
    t = gcm(key + salt)
    esp = t.seal(0x99, 5, b"\x00\x01\x02\x03")
    assert esp[8:16] == (5).to_bytes(8, "big")
    assert AESGCM(key).decrypt(salt + esp[8:16], esp[16:], esp[:8]) == b"\x00\x01\x02\x03"


def test_gcm_esn_aad_is_spi_seqhi_seqlo() -> None:
    """RFC 4106 section 5: AAD = SPI || SeqH || SeqL (12 octets) with ESN; the IV is all 64 bits."""
    key, salt = os.urandom(32), os.urandom(4)
    t = gcm(key + salt, esn=True)
    seq = (3 << 32) | 4
    esp = t.seal(0x99, seq, b"wxyz")
    assert esp[4:8] == (4).to_bytes(4, "big")
    assert esp[8:16] == seq.to_bytes(8, "big")
    aad = struct.pack("!III", 0x99, 3, 4)
    assert AESGCM(key).decrypt(salt + esp[8:16], esp[16:], aad) == b"wxyz"


# --- RFC 7634 Appendix A: ChaCha20-Poly1305 -----------------------------------------------------

RFC7634_KEYMAT = bytes(range(0x80, 0xA0)) + h("a0a1a2a3")
RFC7634_PLAINTEXT = h(
    "4500005 4a6f20000 4001e778 c6336405 c0000205 08005b7a 3a080000 553bec10 00073627"
    " 08090a0b 0c0d0e0f 10111213 14151617 18191a1b 1c1d1e1f 20212223 24252627 28292a2b"
    " 2c2d2e2f 30313233 34353637 01020204".replace(" ", "")
)
RFC7634_CIPHERTEXT_TAG = h(
    "24039428b97f417e3c13753a4f05087b67c352e6a7fab1b982d466ef407ae5c614ee8099d52844eb61aa95df"
    "ab4c02f72aa71e7c4c4f64c9befe2facc638e8f3cbec163fac469b502773f6fb94e664da9165b82829f641e0"
    "76aaa8266b7fb0f7b11b369907e1ad43"
)


def test_rfc7634_appendix_a_transform() -> None:
    t = make_transform(params(EncAlg.CHACHA20_POLY1305, RFC7634_KEYMAT), os.urandom)
    esp = t.seal_with_iv(0x01020304, 5, h("1011121314151617"), RFC7634_PLAINTEXT)
    assert esp == h("0102030400000005") + h("1011121314151617") + RFC7634_CIPHERTEXT_TAG
    assert t.open(esp, 0, len(esp), 5) == RFC7634_PLAINTEXT


def test_chacha20_matches_cryptography_directly() -> None:
    key, salt = os.urandom(32), os.urandom(4)
    t = make_transform(params(EncAlg.CHACHA20_POLY1305, key + salt), os.urandom)
    esp = t.seal(0x42, 77, b"1234")
    assert ChaCha20Poly1305(key).decrypt(salt + esp[8:16], esp[16:], esp[:8]) == b"1234"


# --- padding (RFC 4303 section 2.4) -------------------------------------------------------------


@pytest.mark.parametrize(
    "transform,length,pad",
    [("gcm", 17, 1), ("cbc", 17, 13), ("gcm", 2, 0), ("cbc", 14, 0), ("null", 0, 2),
     ("cbc", 0, 14)],
)
def test_trailer_pads_to_the_block(transform: str, length: int, pad: int) -> None:
    """esp.md section 2 TEST: a 17-octet payload gets pad 1 with GCM and 13 with AES-CBC."""
    t = {"gcm": gcm(bytes(20)), "cbc": cbc(bytes(16)), "null": null(bytes(32))}[transform]
    tr = trailer(t, length, 41)
    assert tr == bytes(range(1, pad + 1)) + bytes([pad, 41])
    assert (length + len(tr)) % t.block == 0


# --- configuration errors -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "enc,key,auth,akey,message",
    [
        (EncAlg.AES_GCM_16, bytes(20), AuthAlg.HMAC_SHA256_128, bytes(32), "combined mode"),
        (EncAlg.AES_GCM_16, bytes(16), AuthAlg.NONE, b"", "AES-GCM key"),
        (EncAlg.AES_GCM_16, bytes(17), AuthAlg.NONE, b"", "AES-GCM key"),
        (EncAlg.CHACHA20_POLY1305, bytes(32), AuthAlg.NONE, b"", "ChaCha20"),
        (EncAlg.AES_CBC, bytes(16), AuthAlg.NONE, b"", "needs an integrity"),
        (EncAlg.AES_CBC, bytes(15), AuthAlg.HMAC_SHA256_128, bytes(32), "AES-CBC key"),
        (EncAlg.AES_CBC, bytes(16), AuthAlg.HMAC_SHA256_128, bytes(16), "32 octets"),
        (EncAlg.NULL, b"", AuthAlg.NONE, b"", "needs an integrity"),
        (EncAlg.NULL, bytes(16), AuthAlg.HMAC_SHA256_128, bytes(32), "no key"),
    ],
)
def test_bad_configurations_raise_config_error(enc, key, auth, akey, message) -> None:
    with pytest.raises(ConfigError, match=message):
        make_transform(params(enc, key, auth, akey), os.urandom)


def test_transform_names() -> None:
    assert gcm(bytes(20)).name == "aes128-gcm-16"
    assert gcm(bytes(36)).name == "aes256-gcm-16"
    assert cbc(bytes(32)).name == "aes256-cbc+hmac-sha256-128"
    assert null(bytes(32)).name == "null+hmac-sha256-128"
