"""ESP transforms: one object per SA, built once, holding the keyed cipher/MAC objects.

A transform turns ``plaintext`` (payload || padding || Pad Length || Next Header, RFC 4303
section 2) into the on-the-wire ESP bytes ``SPI | Seq | IV | ciphertext | ICV`` and back.

| transform                | RFC        | IV (explicit)        | ICV | pad to |
|--------------------------|------------|----------------------|-----|--------|
| AES-GCM (16-octet ICV)   | 4106       | 8: the 64-bit seq    | 16  | 4      |
| ChaCha20-Poly1305        | 7634       | 8: the 64-bit seq    | 16  | 4      |
| AES-CBC + HMAC-SHA-256-128 | 3602/4868 | 16: random (``rand``) | 16 | 16    |
| NULL + HMAC-SHA-256-128  | 2410/4868  | none                 | 16  | 4      |

AEAD IV rule: RFC 4106 section 3.1 / RFC 7634 section 2 only ask for an IV that never repeats under
a key; we send the 64-bit sequence number. (key, nonce) uniqueness therefore reduces to "never reuse
a sequence number under a key", which ``bits/seqstore.py`` keeps true across restarts.

The hot path sits in ``seal`` and ``open``: precompiled structs, no per-packet allocations beyond
the byte strings the crypto library has to return. ``open`` returns ``None`` when the ICV / AEAD
tag does not verify; callers turn that into ``Drop(AUTH_FAILED)``.
"""

from __future__ import annotations

import hmac
import struct
from collections.abc import Callable
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from .constants import AuthAlg, EncAlg
from .errors import ConfigError
from .sa import SaParams

Rand = Callable[[int], bytes]

# --- Specification -------------------------------------------------------------------------------

AEAD_IV_LEN = 8  # RFC 4106 section 3.1, RFC 7634 section 2
AEAD_SALT_LEN = 4  # RFC 4106 section 8.1, RFC 7634 section 2
AEAD_ICV_LEN = 16  # RFC 4106 section 6 (16 MUST), RFC 7634 section 2
AES_BLOCK = 16  # RFC 3602 section 2.4
CBC_IV_LEN = 16  # RFC 3602 section 3
HMAC_SHA256_KEY_LEN = 32  # RFC 4868 section 2.1.1
HMAC_SHA256_128_ICV_LEN = 16  # RFC 4868 section 2.3
ESP_ALIGN = 4  # RFC 4303 section 2.4: the ICV starts on a 4-octet boundary

_GCM_KEY_LENS = (16, 24, 32)
_CBC_KEY_LENS = (16, 24, 32)
_CHACHA_KEY_LEN = 32

# --- wire helpers --------------------------------------------------------------------------------

_HDR = struct.Struct("!II")  # SPI, low 32 bits of the sequence number (RFC 4303 section 2)
_HDR_IV64 = struct.Struct("!IIQ")  # SPI, seq low, 8-octet IV (= the 64-bit sequence number)
_AAD_ESN = struct.Struct("!III")  # SPI, seq high, seq low (RFC 4106 section 5)
_U32 = struct.Struct("!I")
_NONCE = struct.Struct("!4sQ")  # salt || 64-bit IV (RFC 4106 section 4, RFC 7634 section 2)
_MASK32 = 0xFFFFFFFF

#: Default padding content 1, 2, 3, ... (RFC 4303 section 2.4); ``PAD[:n]`` is n octets of padding.
PAD = bytes(range(1, 256))


def _trailer_table(block: int) -> tuple[bytes, ...]:
    """``table[(pad_len << 8) | next_header]`` = padding || Pad Length || Next Header."""
    return tuple(PAD[:pad] + bytes((pad, nh)) for pad in range(block) for nh in range(256))


_TRAILERS = {4: _trailer_table(4), 16: _trailer_table(16)}


def is_aead(transform: Transform) -> bool:
    """True for the combined-mode transforms whose ``aead``/``salt`` the SA may use directly."""
    return isinstance(transform, _AeadTransform)


class Transform(Protocol):
    """What ``SecurityAssociation`` needs from a transform."""

    name: str
    iv_len: int  # explicit IV octets on the wire
    icv_len: int
    block: int  # payload || trailer is padded to a multiple of this (RFC 4303 section 2.4)
    trailers: tuple[bytes, ...]  # see _trailer_table
    esn: bool

    def seal(self, spi: int, seq: int, plaintext: bytes) -> bytes:
        """ESP header, IV, ciphertext and ICV for ``plaintext`` (already padded)."""
        ...

    def seal_with_iv(self, spi: int, seq: int, iv: bytes, plaintext: bytes) -> bytes:
        """``seal`` with a given explicit IV (known-answer tests only)."""
        ...

    def open(self, packet: bytes, esp_offset: int, end: int, seq: int) -> bytes | None:
        """Verify and decrypt the ESP packet in ``packet[esp_offset:end]``; ``seq`` is the full
        (ESN-inferred) sequence number. Returns the padded plaintext or ``None`` if the ICV fails.
        The caller has checked the length: at least header + IV + ICV + 2 (+ block alignment)."""
        ...


def trailer(transform: Transform, payload_len: int, next_header: int) -> bytes:
    """Padding 1, 2, 3, ... || Pad Length || Next Header for a payload of ``payload_len`` octets."""
    pad = -(payload_len + 2) % transform.block
    return transform.trailers[(pad << 8) | next_header]


# --- AEAD: AES-GCM (RFC 4106), ChaCha20-Poly1305 (RFC 7634) --------------------------------------


class _AeadTransform:
    """Combined-mode ESP: nonce = salt || IV, AAD = SPI || Seq (|| with ESN: SPI || SeqH || SeqL).

    RFC 4106 sections 3-5, RFC 7634 sections 2-3. The explicit IV is the 64-bit sequence number.
    """

    __slots__ = ("name", "iv_len", "icv_len", "block", "trailers", "esn", "aead", "salt")

    def __init__(self, name: str, aead: AESGCM | ChaCha20Poly1305, salt: bytes, esn: bool) -> None:
        self.name = name
        self.iv_len = AEAD_IV_LEN
        self.icv_len = AEAD_ICV_LEN
        self.block = ESP_ALIGN
        self.trailers = _TRAILERS[ESP_ALIGN]
        self.esn = esn
        # public for the SA's inlined fast path (bits/esp.py); both are key material
        self.aead = aead
        self.salt = salt

    def seal(self, spi: int, seq: int, plaintext: bytes) -> bytes:
        head = _HDR_IV64.pack(spi, seq & _MASK32, seq)
        if self.esn:
            aad = _AAD_ESN.pack(spi, seq >> 32, seq & _MASK32)
        else:
            aad = head[:8]
        return head + self.aead.encrypt(_NONCE.pack(self.salt, seq), plaintext, aad)

    def seal_with_iv(self, spi: int, seq: int, iv: bytes, plaintext: bytes) -> bytes:
        if len(iv) != AEAD_IV_LEN:
            raise ValueError("AEAD explicit IV is 8 octets")
        head = _HDR.pack(spi, seq & _MASK32)
        aad = _AAD_ESN.pack(spi, seq >> 32, seq & _MASK32) if self.esn else head
        return head + iv + self.aead.encrypt(self.salt + iv, plaintext, aad)

    def open(self, packet: bytes, esp_offset: int, end: int, seq: int) -> bytes | None:
        if self.esn:
            aad = _AAD_ESN.pack(_U32.unpack_from(packet, esp_offset)[0], seq >> 32, seq & _MASK32)
        else:
            aad = packet[esp_offset : esp_offset + 8]
        nonce = self.salt + packet[esp_offset + 8 : esp_offset + 16]
        try:
            return self.aead.decrypt(nonce, packet[esp_offset + 16 : end], aad)
        except InvalidTag:
            return None


# --- integrity: HMAC-SHA-256-128 (RFC 4868) ------------------------------------------------------


class _Hmac128:
    """HMAC-SHA-256 truncated to 128 bits (RFC 4868 section 2.3), keyed once per SA.

    With ESN the high 32 bits of the sequence number are appended to the MAC input only
    (RFC 4303 section 2.2.1).
    """

    __slots__ = ("_mac", "esn")

    def __init__(self, key: bytes, esn: bool) -> None:
        self._mac = hmac.new(key, digestmod="sha256")
        self.esn = esn

    def icv(self, data: bytes, seq: int) -> bytes:
        mac = self._mac.copy()
        mac.update(data)
        if self.esn:
            mac.update(_U32.pack(seq >> 32))
        return mac.digest()[:HMAC_SHA256_128_ICV_LEN]

    def verify(self, packet: bytes, start: int, end: int, seq: int) -> bool:
        """Check the ICV in ``packet[end-16:end]`` over ``packet[start:end-16]``."""
        mac = self._mac.copy()
        mac.update(memoryview(packet)[start : end - HMAC_SHA256_128_ICV_LEN])
        if self.esn:
            mac.update(_U32.pack(seq >> 32))
        return hmac.compare_digest(
            mac.digest()[:HMAC_SHA256_128_ICV_LEN], packet[end - HMAC_SHA256_128_ICV_LEN : end]
        )


# --- AES-CBC + HMAC-SHA-256-128 (RFC 3602, RFC 4868) ---------------------------------------------


class _CbcHmacTransform:
    """AES-CBC with a random 16-octet IV (RFC 3602 section 3), encrypt-then-MAC: the ICV covers
    SPI | Seq | IV | ciphertext (RFC 4303 section 3.3.2).

    One CBC encryptor and one decryptor live as long as the SA (building a ``Cipher`` costs more
    than encrypting a 1400-octet packet). CBC's only state is its chaining block ``c_prev``, the
    last ciphertext block it saw, so a packet with IV ``iv`` is encrypted by feeding the first
    plaintext block XOR ``iv`` XOR ``c_prev``: the cipher then computes E(P1 XOR iv), exactly
    standard CBC under ``iv``. Decryption fixes the first output block the same way. The RFC 3602
    section 4 vectors pin this down (tests/test_transforms.py).
    """

    __slots__ = (
        "name", "iv_len", "icv_len", "block", "trailers", "esn",
        "_enc", "_enc_prev", "_dec", "_dec_prev", "_mac", "_rand",
    )

    def __init__(self, key: bytes, mac: _Hmac128, rand: Rand, esn: bool) -> None:
        self.name = f"aes{len(key) * 8}-cbc+hmac-sha256-128"
        self.iv_len = CBC_IV_LEN
        self.icv_len = HMAC_SHA256_128_ICV_LEN
        self.block = AES_BLOCK
        self.trailers = _TRAILERS[AES_BLOCK]
        self.esn = esn
        zero = bytes(AES_BLOCK)
        self._enc = Cipher(algorithms.AES(key), modes.CBC(zero)).encryptor()
        self._dec = Cipher(algorithms.AES(key), modes.CBC(zero)).decryptor()
        self._enc_prev = self._dec_prev = 0  # chaining blocks as ints (the initial IV: zero)
        self._mac = mac
        self._rand = rand

    def seal(self, spi: int, seq: int, plaintext: bytes) -> bytes:
        return self.seal_with_iv(spi, seq, self._rand(CBC_IV_LEN), plaintext)

    def seal_with_iv(self, spi: int, seq: int, iv: bytes, plaintext: bytes) -> bytes:
        if len(iv) != CBC_IV_LEN or not plaintext or len(plaintext) % AES_BLOCK:
            raise ValueError("AES-CBC takes a 16-octet IV and whole, non-empty blocks")
        first = int.from_bytes(plaintext[:AES_BLOCK], "big") ^ int.from_bytes(iv, "big")
        first ^= self._enc_prev
        ct = self._enc.update(first.to_bytes(AES_BLOCK, "big") + plaintext[AES_BLOCK:])
        self._enc_prev = int.from_bytes(ct[-AES_BLOCK:], "big")
        body = _HDR.pack(spi, seq & _MASK32) + iv + ct
        return body + self._mac.icv(body, seq)

    def open(self, packet: bytes, esp_offset: int, end: int, seq: int) -> bytes | None:
        if not self._mac.verify(packet, esp_offset, end, seq):
            return None
        start, stop = esp_offset + 8 + CBC_IV_LEN, end - HMAC_SHA256_128_ICV_LEN
        if stop <= start or (stop - start) % AES_BLOCK:
            raise ValueError("AES-CBC ciphertext must be whole, non-empty blocks")
        pt = self._dec.update(packet[start:stop])
        fix = self._dec_prev ^ int.from_bytes(packet[start - CBC_IV_LEN : start], "big")
        self._dec_prev = int.from_bytes(packet[stop - AES_BLOCK : stop], "big")
        first = int.from_bytes(pt[:AES_BLOCK], "big") ^ fix
        return first.to_bytes(AES_BLOCK, "big") + pt[AES_BLOCK:]


# --- NULL + HMAC-SHA-256-128 (RFC 2410, RFC 4868) ------------------------------------------------


class _NullHmacTransform:
    """NULL encryption (RFC 2410: block size 1, no IV) with HMAC-SHA-256-128 integrity."""

    __slots__ = ("name", "iv_len", "icv_len", "block", "trailers", "esn", "_mac")

    def __init__(self, mac: _Hmac128, esn: bool) -> None:
        self.name = "null+hmac-sha256-128"
        self.iv_len = 0
        self.icv_len = HMAC_SHA256_128_ICV_LEN
        self.block = ESP_ALIGN
        self.trailers = _TRAILERS[ESP_ALIGN]
        self.esn = esn
        self._mac = mac

    def seal(self, spi: int, seq: int, plaintext: bytes) -> bytes:
        body = _HDR.pack(spi, seq & _MASK32) + plaintext
        return body + self._mac.icv(body, seq)

    def seal_with_iv(self, spi: int, seq: int, iv: bytes, plaintext: bytes) -> bytes:
        if iv:
            raise ValueError("NULL encryption has no IV")
        return self.seal(spi, seq, plaintext)

    def open(self, packet: bytes, esp_offset: int, end: int, seq: int) -> bytes | None:
        if not self._mac.verify(packet, esp_offset, end, seq):
            return None
        return packet[esp_offset + 8 : end - HMAC_SHA256_128_ICV_LEN]


# --- construction --------------------------------------------------------------------------------


def make_transform(params: SaParams, rand: Rand) -> Transform:
    """Build the keyed transform for ``params``; raises ConfigError on a bad algorithm/key combo."""
    enc, auth, key = params.enc, params.auth, params.enc_key
    if enc in (EncAlg.AES_GCM_16, EncAlg.CHACHA20_POLY1305):
        if auth is not AuthAlg.NONE:
            raise ConfigError(f"{enc.value} is a combined mode: it takes no integrity algorithm")
        aead_key, salt = key[:-AEAD_SALT_LEN], key[-AEAD_SALT_LEN:]
        if enc is EncAlg.AES_GCM_16:
            if len(aead_key) not in _GCM_KEY_LENS:
                raise ConfigError("AES-GCM key must be 16, 24 or 32 octets and a 4-octet salt")
            name = f"aes{len(aead_key) * 8}-gcm-16"
            return _AeadTransform(name, AESGCM(aead_key), salt, params.esn)
        if len(aead_key) != _CHACHA_KEY_LEN:
            raise ConfigError("ChaCha20-Poly1305 key must be 32 octets and a 4-octet salt")
        return _AeadTransform("chacha20-poly1305", ChaCha20Poly1305(aead_key), salt, params.esn)
    mac = _make_hmac(params)
    if enc is EncAlg.AES_CBC:
        if len(key) not in _CBC_KEY_LENS:
            raise ConfigError("AES-CBC key must be 16, 24 or 32 octets")
        return _CbcHmacTransform(key, mac, rand, params.esn)
    if enc is EncAlg.NULL:
        if key:
            raise ConfigError("NULL encryption takes no key")
        return _NullHmacTransform(mac, params.esn)
    raise ConfigError(f"unsupported encryption algorithm {enc!r}")


def _make_hmac(params: SaParams) -> _Hmac128:
    if params.auth is not AuthAlg.HMAC_SHA256_128:
        # RFC 4303 section 3.2: ESP with NULL encryption needs integrity; AES-CBC alone is
        # malleable (RFC 3602 section 5), so we never offer it without a MAC.
        raise ConfigError(f"{params.enc.value} needs an integrity algorithm (hmac-sha256-128)")
    if len(params.auth_key) != HMAC_SHA256_KEY_LEN:
        raise ConfigError("HMAC-SHA-256-128 key must be 32 octets (RFC 4868 section 2.1.1)")
    return _Hmac128(params.auth_key, params.esn)


__all__ = ["PAD", "Rand", "Transform", "is_aead", "make_transform", "trailer"]
