"""The Mobile IPv6 SAs and policies the tunnel and DSMIPv6 tests share (RFC 4877 style: transport SAs
for BU/BA selected by MH type, tunnel SAs HoA <-> HA for payload, host-wide entries last)."""

from __future__ import annotations

HOA, HA = "2001:db8:1::100", "2001:db8:1::1"
SPI_BU, SPI_BA, SPI_MN_DATA, SPI_HA_DATA = 0x1001, 0x1002, 0x1007, 0x1008


def key(n: int) -> str:
    return "0x" + f"{n:02x}" * 20


SAS = f"""
add {HOA} {HA} esp {SPI_BU:#x} -m transport -u 1 -E aes-gcm-16 {key(1)};
add {HA} {HOA} esp {SPI_BA:#x} -m transport -u 2 -E aes-gcm-16 {key(2)};
add {HOA} {HA} esp {SPI_MN_DATA:#x} -m tunnel -u 7 -E aes-gcm-16 {key(7)};
add {HA} {HOA} esp {SPI_HA_DATA:#x} -m tunnel -u 8 -E aes-gcm-16 {key(8)};
"""
MN_SPD = f"""
spdadd {HOA} {HA} mh bu -P out ipsec esp/transport//unique:1;
spdadd {HA} {HOA} mh ba -P in ipsec esp/transport//unique:2;
spdadd {HOA} ::/0 any -P out ipsec esp/tunnel/{HOA}-{HA}/unique:7;
spdadd ::/0 {HOA} any -P in ipsec esp/tunnel/{HA}-{HOA}/unique:8;
spddefault out bypass;
spddefault in bypass;
"""
HA_SPD = f"""
spdadd {HA} {HOA} mh ba -P out ipsec esp/transport//unique:2;
spdadd {HOA} {HA} mh bu -P in ipsec esp/transport//unique:1;
spdadd ::/0 {HOA} any -P out ipsec esp/tunnel/{HA}-{HOA}/unique:8;
spdadd {HOA} ::/0 any -P in ipsec esp/tunnel/{HOA}-{HA}/unique:7;
spddefault out bypass;
spddefault in bypass;
"""

SPD = {"mn": MN_SPD, "ha": HA_SPD}
LOCAL = {"mn": HOA, "ha": HA}

#: An engine process for the namespace tests: rules, NFQUEUE processor, setkey text; argv: NODE.toml,
#: setkey file, local addresses (comma-separated).
ENGINE = r'''
import os, sys, time
from bits.engine import build_engine
from bits.setkey import parse_setkey
from bits.io.iptables import rules_install, rules_remove
from bits.io.nfqueue import run_processor
from mipbits.nodeconfig import load_node_config

cfg = load_node_config(sys.argv[1])
text = open(sys.argv[2]).read()
local = sys.argv[3].split(",")
rules_install(cfg)
try:
    run_processor(cfg, lambda tracer, direction: build_engine(
        parse_setkey(text, local_addresses=local), rand=os.urandom, now=time.monotonic(), tracer=tracer))
finally:
    rules_remove(cfg)
'''
