"""NODE.toml loading: defaults, relative paths, and errors that name the file and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from bits.errors import ConfigError
from bits.trace import TraceLevel
from mipbits.nodeconfig import load_node_config

FULL = """
[node]
name = "a"
role = "ha"

[ipsec]
sa_file = "keys/a.setkey"
state_dir = "/var/lib/mipbits/a"

[queues]
outbound = [0, 1]
inbound = 2
workers = 2
maxlen = 2048

[trace]
path = "trace.jsonl"
level = "all"
max_bytes = 65536
keep = 5

[control]
socket = "/run/mipbits/a.sock"

[rules]
ipv6 = false
interfaces = ["eth0", "wlan+"]
nd_bypass = false

[mobility]
home_agent = "2001:db8::1"
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "node.toml"
    p.write_text(text)
    return p


def test_full_file(tmp_path: Path) -> None:
    cfg = load_node_config(write(tmp_path, FULL))
    assert (cfg.name, cfg.role) == ("a", "ha")
    assert cfg.sa_file == str(tmp_path / "keys" / "a.setkey")
    assert cfg.state_dir == "/var/lib/mipbits/a"
    assert (cfg.queues.outbound, cfg.queues.inbound, cfg.queues.workers, cfg.queues.maxlen) == ((0, 1), (2,), 2, 2048)
    assert cfg.trace.path == str(tmp_path / "trace.jsonl")
    assert (cfg.trace.level, cfg.trace.max_bytes, cfg.trace.keep) == (TraceLevel.ALL, 65536, 5)
    assert cfg.control_socket == "/run/mipbits/a.sock"
    rules = cfg.rules
    assert (rules.ipv4, rules.ipv6, rules.interfaces, rules.nd_bypass) == (True, False, ("eth0", "wlan+"), False)
    assert cfg.sections == {"mobility": {"home_agent": "2001:db8::1"}}


def test_minimal_file_defaults(tmp_path: Path) -> None:
    cfg = load_node_config(write(tmp_path, '[node]\nname = "b"\n'))
    assert cfg.role == "ipsec" and cfg.sa_file is None
    assert (cfg.queues.outbound, cfg.queues.inbound, cfg.queues.workers) == ((0,), (1,), 1)
    assert cfg.trace.level == TraceLevel.OFF and cfg.trace.path is None
    assert cfg.control_socket == "/run/mipbits/b.sock" and cfg.state_dir == "/var/lib/mipbits/b"


def test_trace_path_alone_means_drops(tmp_path: Path) -> None:
    cfg = load_node_config(write(tmp_path, '[node]\nname = "b"\n[trace]\npath = "/tmp/t.jsonl"\n'))
    assert cfg.trace.level == TraceLevel.DROPS


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", r"\[node\]: missing section"),
        ('[node]\nrole = "ipsec"\n', r"\[node\] name: missing"),
        ('[node]\nname = "a b"\n', r"\[node\] name: 'a b'"),
        ('[node]\nname = "a"\nrole = "router"\n', r"\[node\] role: must be one of ipsec, mn, ha"),
        ('[node]\nname = "a"\ncolour = 1\n', r"\[node\] colour: unknown key"),
        ('[node]\nname = "a"\n[queues]\nworkers = 3\n', r"\[queues\] workers: must be 1 or 2, got 3"),
        ('[node]\nname = "a"\n[queues]\nworkers = "2"\n', r"\[queues\] workers: must be an integer"),
        ('[node]\nname = "a"\n[queues]\noutbound = [0, 2]\n', r"\[queues\] outbound: .* not a contiguous"),
        ('[node]\nname = "a"\n[queues]\noutbound = 1\n', r"\[queues\] inbound: shares queue\(s\) \[1\]"),
        ('[node]\nname = "a"\n[queues]\ninbound = 70000\n', r"\[queues\] inbound: queue numbers are integers"),
        ('[node]\nname = "a"\n[queues]\noutbound = []\n', r"\[queues\] outbound: needs at least one"),
        ('[node]\nname = "a"\n[trace]\nlevel = "all"\n', r"\[trace\] path: needed for level all"),
        ('[node]\nname = "a"\n[trace]\npath = "t"\nlevel = "loud"\n', r"\[trace\] level: must be off, drops or all"),
        ('[node]\nname = "a"\n[trace]\npath = "t"\nmax_bytes = 10\n', r"\[trace\] max_bytes: must be at least"),
        ('[node]\nname = "a"\n[rules]\nipv4 = false\nipv6 = false\n', r"\[rules\] ipv6: ipv4 and ipv6 cannot both"),
        ('[node]\nname = "a"\n[rules]\ninterfaces = ["lo"]\n', r"\[rules\] interfaces: bad interface name 'lo'"),
        ('[node]\nname = "a"\n[ipsec]\nsa_file = ""\n', r"\[ipsec\] sa_file: must not be empty"),
        ("[node]\nname = 'a'\nqueues = 3\n", r"\[node\] queues: unknown key"),
        ('[node]\nname = "a"\n[control]\nsocket = 5\n', r"\[control\] socket: must be a string"),
    ],
)
def test_errors_name_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    p = write(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as info:
        load_node_config(p)
    assert str(info.value).startswith(f"{p}: ")
    assert info.value.path == str(p)


def test_toml_syntax_error_has_line(tmp_path: Path) -> None:
    p = write(tmp_path, '[node]\nname = "a"\nrole = \n')
    with pytest.raises(ConfigError, match="TOML syntax") as info:
        load_node_config(p)
    assert info.value.line == 3 and str(info.value).startswith(f"{p}:3: ")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_node_config(tmp_path / "nope.toml")
