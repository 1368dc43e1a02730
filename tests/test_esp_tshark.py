"""tshark 4.0 decrypts and verifies what we emit (see shared/reference/verify-with-tshark.md).

tshark 4.0 has no ChaCha20-Poly1305 and no ESN; ChaCha20 packets are checked with ``cryptography``
following RFC 7634 instead. Marked ``tshark``: deselect with ``-m "not tshark"``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from scapy.layers.inet import IP
from scapy.layers.inet6 import IPv6
from scapy.utils import wrpcap

from .test_esp_support import MODES, TRANSFORMS, find_esp, inner_packet, sa_pair

pytestmark = pytest.mark.tshark

TSHARK_ENC = {
    "gcm128": "AES-GCM with 16 octet ICV [RFC4106]",
    "gcm256": "AES-GCM with 16 octet ICV [RFC4106]",
    "cbc": "AES-CBC [RFC3602]",
    "null": "NULL",
}
#: what the ESP Next Header must be, and a field of the decrypted payload tshark must show
EXPECTED = {
    "transport4": (17, "udp.dstport", "5678"),
    "transport6": (17, "udp.dstport", "5678"),
    "transport6-mip": (135, "mip6.mhtype", "5"),
    "tunnel6in6": (41, "udp.dstport", "5678"),
    "tunnel4in6": (4, "udp.dstport", "5678"),
    "tunnel6in4": (41, "udp.dstport", "5678"),
    "tunnel4in4": (4, "udp.dstport", "5678"),
}


def uat(spi: int, transform: str, family: int) -> str:
    _, key, _, akey, _, _ = TRANSFORMS[transform]
    auth = "HMAC-SHA-256-128 [RFC4868]" if akey else "NULL"
    fields = [f"IPv{family}", "*", "*", f"0x{spi:08x}", TSHARK_ENC[transform],
              f"0x{key.hex()}" if key else "", auth, f"0x{akey.hex()}" if akey else ""]
    return "uat:esp_sa:" + ",".join(f'"{f}"' for f in fields)


@pytest.mark.parametrize("transform", list(TSHARK_ENC))
def test_tshark_decrypts_every_mode_with_good_icv(transform: str, tmp_path: Path) -> None:
    tshark = shutil.which("tshark")
    assert tshark, "tshark is required for tests marked 'tshark' (deselect with -m 'not tshark')"
    packets, options, expected = [], [], []
    for i, mode in enumerate(MODES):
        spi = 0x2000 + i
        out, _ = sa_pair(transform, mode, spi=spi, start_seq=10 * i)
        for payload in (b"a", b"tshark " * 20):
            pkt = out.encapsulate(inner_packet(mode, payload), 0.0)
            assert isinstance(pkt, bytes)
            packets.append(IPv6(pkt) if pkt[0] >> 4 == 6 else IP(pkt))
            expected.append((spi, out.seq, *EXPECTED[mode]))
        options += ["-o", uat(spi, transform, MODES[mode][1])]
    pcap = tmp_path / f"{transform}.pcap"
    wrpcap(str(pcap), packets, linktype=101)  # LINKTYPE_RAW: IPv4 and IPv6 in one file
    fields = ["frame.number", "esp.spi", "esp.sequence", "esp.icv_good", "esp.protocol",
              "udp.dstport", "mip6.mhtype"]
    cmd = [tshark, "-n", "-r", str(pcap), "-o", "esp.enable_encryption_decode:TRUE",
           "-o", "esp.enable_authentication_check:TRUE", *options,
           "-T", "fields", "-E", "separator=/t"]
    for f in fields:
        cmd += ["-e", f]
    env = dict(os.environ, HOME=str(tmp_path))
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, check=False)
    assert res.returncode == 0, res.stderr
    rows = [line.split("\t") for line in res.stdout.splitlines()]
    assert len(rows) == len(expected)
    for row, (spi, seq, nh, field, value) in zip(rows, expected):
        got = dict(zip(fields, row))
        assert int(got["esp.spi"], 0) == spi
        assert int(got["esp.sequence"]) == seq
        assert got["esp.icv_good"] == "1", (transform, row)
        assert int(got["esp.protocol"], 0) == nh, row
        assert value in got[field].split(","), (field, row)  # the decrypted payload was dissected


@pytest.mark.parametrize("mode", list(MODES))
def test_chacha20_packets_open_with_cryptography(mode: str) -> None:
    """RFC 7634 section 2-3: nonce = salt || IV, AAD = SPI || Seq, tag over the ciphertext."""
    out, _ = sa_pair("chacha", mode)
    key_salt = TRANSFORMS["chacha"][1]
    aead, salt = ChaCha20Poly1305(key_salt[:32]), key_salt[32:]
    original = inner_packet(mode)
    pkt = out.encapsulate(original, 0.0)
    assert isinstance(pkt, bytes)
    esp = find_esp(pkt)
    plaintext = aead.decrypt(salt + pkt[esp + 8 : esp + 16], pkt[esp + 16 :], pkt[esp : esp + 8])
    pad, nh = plaintext[-2], plaintext[-1]
    assert plaintext[-2 - pad : -2] == bytes(range(1, pad + 1))
    assert nh == EXPECTED[mode][0]
    assert original.endswith(plaintext[: -2 - pad])
