"""``mipbits ipsec encrypt|decrypt`` on pcap files: tshark reads and decrypts what we write."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from click.testing import CliRunner
from scapy.layers.inet6 import UDP, IPv6
from scapy.packet import Raw
from scapy.utils import rdpcap, wrpcap

from mipbits.cli import main

A, B, C = "2001:db8:a::1", "2001:db8:b::1", "2001:db8:c::1"
GCM_KEY = "0x00112233445566778899aabbccddeeffcafebabe"
SAS = f"""
add {A} {B} esp 0x1001 -m transport -E aes-gcm-16 {GCM_KEY};
add {B} {A} esp 0x1002 -m transport -E aes-gcm-16 0x{'55' * 20};
"""
VIEW_A = SAS + f"spdadd {A} {B} any -P out ipsec esp/transport//require;\nspdadd {B} {A} any -P in ipsec esp/transport//require;\n"
VIEW_B = SAS + f"spdadd {B} {A} any -P out ipsec esp/transport//require;\nspdadd {A} {B} any -P in ipsec esp/transport//require;\n"


def _conf(tmp_path, name: str, text: str) -> str:
    p = tmp_path / name
    p.write_text(text)
    os.chmod(p, 0o600)
    return str(p)


def _clear_pcap(tmp_path) -> str:
    pkts = [IPv6(src=A, dst=B) / UDP(sport=1000, dport=2000) / Raw(b"msg%d" % i) for i in range(3)]
    pkts.append(IPv6(src=A, dst=C) / UDP(sport=1, dport=2))  # no policy: default DISCARD
    path = str(tmp_path / "clear.pcap")
    wrpcap(path, pkts)
    return path


def _run(*args: str):
    return CliRunner().invoke(main, list(args))


def test_encrypt_then_decrypt_round_trip(tmp_path):
    a_conf, b_conf = _conf(tmp_path, "a.conf", VIEW_A), _conf(tmp_path, "b.conf", VIEW_B)
    clear, esp, back = _clear_pcap(tmp_path), str(tmp_path / "esp.pcap"), str(tmp_path / "back.pcap")
    state = str(tmp_path / "state")
    r = _run("ipsec", "encrypt", "--sa", a_conf, "--local", A, "--state-dir", state, clear, esp)
    assert r.exit_code == 0, r.output
    assert "frame 4: dropped: discard-policy" in r.output  # reported, not skipped silently
    enc = rdpcap(esp)
    assert len(enc) == 3 and all(p.nh == 50 for p in enc)
    r = _run("ipsec", "decrypt", "--sa", b_conf, "--local", B, "--state-dir", state, esp, back)
    assert r.exit_code == 0, r.output
    assert [bytes(p[Raw]) for p in rdpcap(back)] == [b"msg0", b"msg1", b"msg2"]


def test_decrypt_reports_replay_and_forgery(tmp_path):
    a_conf, b_conf = _conf(tmp_path, "a.conf", VIEW_A), _conf(tmp_path, "b.conf", VIEW_B)
    esp = str(tmp_path / "esp.pcap")
    state = str(tmp_path / "state")
    assert _run("ipsec", "encrypt", "--sa", a_conf, "--local", A, "--state-dir", state, _clear_pcap(tmp_path), esp).exit_code == 0
    pkts = rdpcap(esp)
    forged = bytearray(bytes(pkts[1]))
    forged[-3] ^= 0x40
    mixed = str(tmp_path / "mixed.pcap")
    wrpcap(mixed, [pkts[0], pkts[0], IPv6(forged)])
    r = _run("ipsec", "decrypt", "--sa", b_conf, "--local", B, "--state-dir", state, mixed, str(tmp_path / "o.pcap"))
    assert r.exit_code == 0
    assert "frame 2: dropped: replay spi=0x00001001 seq=1" in r.output
    assert "frame 3: dropped: auth-failed" in r.output


def test_restart_never_reuses_iv(tmp_path):
    """Two runs with the same static key: sequence numbers (= GCM IVs) never repeat."""
    a_conf = _conf(tmp_path, "a.conf", VIEW_A)
    state = str(tmp_path / "state")
    clear = _clear_pcap(tmp_path)
    seqs = []
    for i in range(2):
        out = str(tmp_path / f"e{i}.pcap")
        assert _run("ipsec", "encrypt", "--sa", a_conf, "--local", A, "--state-dir", state, clear, out).exit_code == 0
        seqs += [bytes(p)[44:48] + bytes(p)[48:56] for p in rdpcap(out)]  # seq + explicit IV
    assert len(seqs) == 6 and len(set(seqs)) == 6


def test_key_file_mode_refused(tmp_path):
    conf = _conf(tmp_path, "a.conf", VIEW_A)
    os.chmod(conf, 0o644)
    r = _run("ipsec", "encrypt", "--sa", conf, "--local", A, "--state-dir", str(tmp_path / "s"),
             _clear_pcap(tmp_path), str(tmp_path / "x.pcap"))
    assert r.exit_code == 2 and "chmod 600" in r.output


def test_bad_config_names_file_and_line(tmp_path):
    conf = _conf(tmp_path, "bad.conf", f"add {A} {B} esp 0x1001 -m transport -E aes-gcm-16 0x1234;\n")
    r = _run("ipsec", "encrypt", "--sa", conf, "--local", A, "--state-dir", str(tmp_path / "s"),
             _clear_pcap(tmp_path), str(tmp_path / "x.pcap"))
    assert r.exit_code == 2 and "bad.conf:1:" in r.output and "key length" in r.output


@pytest.mark.tshark
@pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark missing (make test installs it)")
def test_tshark_decrypts_offline_output(tmp_path):
    a_conf = _conf(tmp_path, "a.conf", VIEW_A)
    esp = str(tmp_path / "esp.pcap")
    assert _run("ipsec", "encrypt", "--sa", a_conf, "--local", A, "--state-dir", str(tmp_path / "s"),
                _clear_pcap(tmp_path), esp).exit_code == 0
    env = dict(os.environ, HOME=str(tmp_path))
    out = subprocess.run(
        ["tshark", "-n", "-r", esp, "-o", "esp.enable_encryption_decode:TRUE",
         "-o", "esp.enable_authentication_check:TRUE",
         "-o", f'uat:esp_sa:"IPv6","*","*","0x00001001","AES-GCM with 16 octet ICV [RFC4106]","{GCM_KEY}","NULL",""',
         "-T", "fields", "-e", "esp.sequence", "-e", "esp.icv_good", "-e", "udp.dstport", "-e", "data.data"],
        capture_output=True, text=True, env=env, check=True,
    ).stdout.split("\n")
    rows = [tuple(line.split("\t")) for line in out if line]
    assert rows == [(str(i + 1), "1", "2000", (b"msg%d" % i).hex()) for i in range(3)]
