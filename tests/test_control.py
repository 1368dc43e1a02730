"""The control socket: server and client over a real Unix socket, access rules, requests; and
``mipbits status`` rendering of a real engine's status."""

from __future__ import annotations

import json
import os
import socket
import stat
import tempfile
import threading
from collections.abc import Iterator

import pytest

from bits.engine import build_engine
from bits.io.control import (
    ControlError,
    ControlServer,
    control_request,
    handle_line,
    make_engine_handler,
    parse_spi,
    selectors_from_request,
)
from bits.io.nfqueue import merge_status
from bits.ip import PacketSelectors
from bits.setkey import parse_setkey
from mipbits.render import render_query, render_status, render_status_json

A4, B4 = "192.0.2.1", "192.0.2.2"
SETKEY = f"""
add {A4} {B4} esp 0x1003 -m tunnel -lh 3600 -E aes-gcm-16 0x{'33' * 16}c1c2c3c4;
add {B4} {A4} esp 0x1004 -m tunnel -E aes-gcm-16 0x{'44' * 16}d1d2d3d4;
spdadd {A4} {B4} any -P out ipsec esp/tunnel/{A4}-{B4}/require;
spdadd {B4} {A4} any -P in ipsec esp/tunnel/{B4}-{A4}/require;
"""


class FakeEngine:
    def __init__(self) -> None:
        self.asked: list[object] = []

    def status(self) -> dict:
        return {"sas": [], "drops": {"replay": 2}}

    def query_outbound(self, sel: object) -> dict:
        self.asked.append(sel)
        return {"action": "protect", "spi": 4096}

    def query_inbound_spi(self, spi: int) -> dict | None:
        self.asked.append(spi)
        return None if spi == 1 else {"spi": spi, "selectors": ["10.0.0.0/24"]}


class Served:
    """A ControlServer serviced by a thread, for client tests."""

    def __init__(self, path: str, handler) -> None:
        self.server = ControlServer(path, handler)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.server.service(0.05)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.server.close()


@pytest.fixture()
def sockdir() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="mbp-ctl-", dir="/tmp")
    os.chmod(d, 0o755)  # so a non-root peer reaches the socket and only its own mode decides
    yield d
    for name in os.listdir(d):
        os.unlink(os.path.join(d, name))
    os.rmdir(d)


@pytest.fixture()
def served(sockdir: str) -> Iterator[tuple[str, FakeEngine]]:
    engine = FakeEngine()
    path = os.path.join(sockdir, "ctl.sock")
    s = Served(path, make_engine_handler(lambda: engine, lambda: {"pid": 7}))
    yield path, engine
    s.close()


def test_socket_file_is_0600(served) -> None:
    path, _ = served
    st = os.stat(path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600


def test_status_has_engine_and_processor(served) -> None:
    path, _ = served
    assert control_request(path, "status") == {"sas": [], "drops": {"replay": 2}, "processor": {"pid": 7}}


def test_ping(served) -> None:
    path, _ = served
    assert control_request(path, "ping") == {"pid": os.getpid()}


def test_query_outbound_builds_packet_selectors(served) -> None:
    path, engine = served
    result = control_request(path, "query_outbound", src="10.0.0.1", dst="10.0.0.2", proto="udp", dport=53)
    assert result == {"action": "protect", "spi": 4096}
    assert engine.asked == [PacketSelectors(4, 0x0A000001, 0x0A000002, 17, None, 53, None, None, None)]


def test_query_inbound_spi_hex_and_none(served) -> None:
    path, engine = served
    assert control_request(path, "query_inbound_spi", spi="0x1000") == {"spi": 4096, "selectors": ["10.0.0.0/24"]}
    assert control_request(path, "query_inbound_spi", spi=1) is None
    assert engine.asked == [4096, 1]


@pytest.mark.parametrize(
    ("request_", "message"),
    [({"cmd": "bogus"}, "unknown cmd"), ({"cmd": "query_inbound_spi", "spi": "x"}, "spi must be"),
     ({"cmd": "query_inbound_spi", "spi": 2**32}, "out of range"),
     ({"cmd": "query_outbound", "src": "10.0.0.1"}, "needs 'dst'"),
     ({"cmd": "query_outbound", "src": "10.0.0.1", "dst": "::1"}, "same IP version"),
     ({"cmd": "query_outbound", "src": "10.0.0.1", "dst": "10.0.0.2", "proto": "gre?"}, "proto must be"),
     ({"cmd": "query_outbound", "src": "10.0.0.1", "dst": "10.0.0.2", "dport": 70000}, "out of range")],
)
def test_bad_requests_are_answered_not_fatal(served, request_: dict, message: str) -> None:
    path, _ = served
    cmd = request_.pop("cmd")
    with pytest.raises(ControlError, match=message):
        control_request(path, cmd, **request_)
    assert control_request(path, "ping")  # the server is still there


def test_raw_protocol_garbage_and_several_requests_per_connection(served) -> None:
    path, _ = served
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(path)
        s.sendall(b'not json\n[1,2]\n{"cmd": "ping"}\n')
        data = b""
        while data.count(b"\n") < 3:
            data += s.recv(4096)
    replies = [json.loads(line) for line in data.splitlines()]
    assert [r["ok"] for r in replies] == [False, False, True]
    assert "bad request" in replies[0]["error"] and '"cmd"' in replies[1]["error"]


def test_handler_exception_becomes_error_reply() -> None:
    def boom(_request):
        raise RuntimeError("engine bug")

    reply = json.loads(handle_line(boom, b'{"cmd": "status"}'))
    assert reply == {"ok": False, "error": "RuntimeError: engine bug"}


def test_no_socket_and_stale_socket_messages(sockdir: str) -> None:
    path = os.path.join(sockdir, "none.sock")
    with pytest.raises(ControlError, match="is the processor running"):
        control_request(path, "ping")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()  # file left behind, nobody listening
    with pytest.raises(ControlError, match="stale socket"):
        control_request(path, "ping")
    s = Served(path, make_engine_handler(FakeEngine))  # a new server replaces a stale file
    try:
        assert control_request(path, "ping")
    finally:
        s.close()
    assert not os.path.exists(path)  # close() removes the socket file


def test_second_server_on_a_live_socket_is_refused(served) -> None:
    path, _ = served
    with pytest.raises(ControlError, match="already listening"):
        ControlServer(path, make_engine_handler(FakeEngine))
    assert control_request(path, "ping")


def test_refuses_a_regular_file(sockdir: str) -> None:
    path = os.path.join(sockdir, "file")
    open(path, "w").close()
    with pytest.raises(ControlError, match="not a socket"):
        ControlServer(path, make_engine_handler(FakeEngine))


@pytest.mark.netns  # needs root (to switch to an unprivileged uid); runs with the namespace tests
def test_non_root_client_is_refused(served) -> None:
    path, _ = served
    assert os.geteuid() == 0, "run as root"
    pid = os.fork()
    if pid == 0:  # child: become nobody, try to talk
        code = 3
        try:
            os.setgid(65534)
            os.setuid(65534)
            try:
                control_request(path, "ping")
                code = 0
            except ControlError as exc:
                code = 1 if "permission denied" in str(exc) else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 1


def test_parse_spi_and_selectors() -> None:
    assert parse_spi("0x1000") == parse_spi("4096") == parse_spi(4096) == 4096
    sel = selectors_from_request({"src": "2001:db8::1", "dst": "2001:db8::2", "proto": "mh", "mh_type": 5})
    assert (sel.version, sel.proto, sel.mh_type, sel.sport) == (6, 135, 5, None)


# -- status rendering with a real engine ---------------------------------------------------------


def real_status(now: float) -> dict:
    engine = build_engine(parse_setkey(SETKEY, local_addresses=[A4]), rand=os.urandom, now=100.0)
    status = engine.status()
    status["processor"] = {"pid": 42, "role": "both", "uptime": 5.0, "monotonic": now, "reloads": 0,
                           "trace_level": "drops",
                           "queues": {"0": {"direction": "out", "accepted": 1, "modified": 2, "dropped": 3,
                                            "errors": 0}}}
    return json.loads(json.dumps(status))  # what crosses the socket


def test_render_status_of_a_real_engine() -> None:
    text = render_status(real_status(now=160.0))
    assert "Security Associations (2):" in text
    assert "0x00001003 out tunnel esp aes128-gcm-16" in text and "192.0.2.1 -> 192.0.2.2" in text
    assert "0x00001004 in" in text
    assert "lifetime left: 59m00s" in text  # -lh 3600, added at 100, now 160
    assert "lifetime left: unlimited" in text
    assert "replay failures 0  auth failures 0" in text
    assert "protect esp/tunnel/192.0.2.1-192.0.2.2/require" in text
    assert "queue 0 (out): accepted 1  modified 2  dropped 3" in text
    assert "\x1b" not in text
    assert "\x1b[1m" in render_status(real_status(160.0), colour=True)


def test_render_status_tolerates_empty_and_unknown() -> None:
    text = render_status({"future": 1})
    assert "Security Associations (0):" in text and "Drops:\n  none" in text


def test_render_status_json_roundtrips() -> None:
    status = real_status(1.0)
    assert json.loads(render_status_json(status)) == status


def test_render_query() -> None:
    assert render_query({"spi": 4096, "action": "protect"}) == "spi: 0x00001000\naction: protect\n"
    assert render_query(None) == "null\n"


def test_merge_status_of_two_workers() -> None:
    out_w, in_w = real_status(1.0), real_status(1.0)
    for sa in out_w["sas"]:
        sa["packets"] = 5 if sa["direction"] == "out" else 0
    for sa in in_w["sas"]:
        sa["packets"] = 7 if sa["direction"] == "in" else 0
    out_w["policies"]["out"][0]["hits"] = 5
    in_w["policies"]["in"][0]["hits"] = 7
    out_w["drops"], in_w["drops"] = {"no-sa": 1}, {"no-sa": 2, "replay": 1}
    merged = merge_status(out_w, in_w)
    assert {(sa["direction"], sa["packets"]) for sa in merged["sas"]} == {("out", 5), ("in", 7)}
    assert merged["policies"]["out"][0]["hits"] == 5 and merged["policies"]["in"][0]["hits"] == 7
    assert merged["drops"] == {"no-sa": 3, "replay": 1}
    assert set(merged["processor"]["workers"]) == {"out", "in"}
    assert "out worker:" in render_status(merged)


def test_queries_against_a_real_engine(sockdir: str) -> None:
    engine = build_engine(parse_setkey(SETKEY, local_addresses=[A4]), rand=os.urandom, now=0.0)
    path = os.path.join(sockdir, "real.sock")
    s = Served(path, make_engine_handler(lambda: engine))
    try:
        out = control_request(path, "query_outbound", src=A4, dst=B4, proto="udp", dport=53)
        assert out["spi"] == 0x1003 and out["policy"]["action"] == "protect"
        inbound = control_request(path, "query_inbound_spi", spi="0x1004")
        assert inbound["spi"] == 0x1004
        assert control_request(path, "query_inbound_spi", spi=0x9999) is None
        status = control_request(path, "status")
        assert {sa["spi"] for sa in status["sas"]} == {0x1003, 0x1004}
    finally:
        s.close()
