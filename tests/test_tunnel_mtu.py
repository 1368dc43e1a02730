"""MTU arithmetic of the tunnel (mobility.tunnel.tunnel_mtus) checked against the real engine.

For each transform, ``esp_tunnel_size`` must equal the length of what ``bits.engine`` really
produces, and ``inner_mtu`` must be the largest inner packet whose ESP packet still fits the TUN
device (path MTU minus the 24 octets the tunnel module may add).
"""

from __future__ import annotations

import pytest
from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6

from bits.constants import AuthAlg, EncAlg
from bits.engine import build_engine
from bits.setkey import parse_setkey
from mobility.tunnel import HAO_OVERHEAD, IPV6_MIN_MTU, esp_shape, esp_tunnel_size, tunnel_mtus

HOA, HA, CN = "2001:db8:1::100", "2001:db8:1::1", "2001:db8:c::1"
TRANSFORMS = {
    "aes-gcm-16": ("-E aes-gcm-16 0x" + "11" * 20, EncAlg.AES_GCM_16, AuthAlg.NONE),
    "chacha20-poly1305": ("-E chacha20-poly1305 0x" + "22" * 36, EncAlg.CHACHA20_POLY1305, AuthAlg.NONE),
    "aes-cbc": ("-E aes-cbc 0x" + "33" * 16 + " -A hmac-sha256 0x" + "44" * 32, EncAlg.AES_CBC,
                AuthAlg.HMAC_SHA256_128),
    "null": ("-E null -A hmac-sha256 0x" + "55" * 32, EncAlg.NULL, AuthAlg.HMAC_SHA256_128),
}


def engine(algs: str):
    conf = f"""
    add {HOA} {HA} esp 0x3001 -m tunnel {algs};
    spdadd {HOA} ::/0 any -P out ipsec esp/tunnel/{HOA}-{HA}/require;
    """
    return build_engine(parse_setkey(conf, local_addresses=[HOA]), rand=lambda n: bytes(n), now=0.0)


def packet(size: int) -> bytes:
    p = bytes(IPv6(src=HOA, dst=CN) / ICMPv6EchoRequest(data=b"z" * (size - 48)))
    assert len(p) == size
    return p


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_esp_tunnel_size_matches_the_engine(name):
    algs, enc, auth = TRANSFORMS[name]
    e, shape = engine(algs), esp_shape(enc, auth)
    for size in range(48, 48 + 40):
        assert len(e.process_outbound(packet(size), 0.0)) == esp_tunnel_size(size, shape)


@pytest.mark.parametrize("name", list(TRANSFORMS))
@pytest.mark.parametrize("path_mtu", [1500, 1400, 9000])
def test_inner_mtu_is_the_largest_that_fits(name, path_mtu):
    algs, enc, auth = TRANSFORMS[name]
    e, plan = engine(algs), tunnel_mtus(path_mtu, esp_shape(enc, auth))
    assert plan.device_mtu == path_mtu - HAO_OVERHEAD
    assert len(e.process_outbound(packet(plan.inner_mtu), 0.0)) <= plan.device_mtu
    assert len(e.process_outbound(packet(plan.inner_mtu + 1), 0.0)) > plan.device_mtu


def test_the_numbers_in_docs_tunnel_md():
    gcm = esp_shape(EncAlg.AES_GCM_16)
    cbc = esp_shape(EncAlg.AES_CBC, AuthAlg.HMAC_SHA256_128)
    null = esp_shape(EncAlg.NULL, AuthAlg.HMAC_SHA256_128)
    assert [tunnel_mtus(1500, s).inner_mtu for s in (gcm, cbc, null)] == [1402, 1390, 1410]
    assert tunnel_mtus(1500, gcm).device_mtu == 1476
    # the smallest path that still carries a 1280-octet inner packet (RFC 8200 5) through the tunnel
    smallest = [min(m for m in range(1280, 1500) if tunnel_mtus(m, s).inner_mtu >= IPV6_MIN_MTU) for s in (gcm, cbc, null)]
    assert smallest == [1380, 1400, 1372]
