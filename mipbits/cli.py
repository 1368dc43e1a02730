"""``mipbits``: the command line and the project's one composition root.

This is the only module that reads configuration files and the environment and wires ``bits``
(the engine) and ``mobility`` together.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from typing import Any

import click

from bits.constants import Direction
from bits.engine import Engine, build_engine
from bits.errors import BitsError
from bits.io.control import ControlError, control_request
from bits.io.iptables import rules_install, rules_remove, rules_show
from bits.io.nfqueue import run_processor
from bits.io.offline import process_capture
from bits.io.seqstore import FileSeqReserver
from bits.setkey import IpsecConfig, load_setkey
from bits.trace import Tracer
from bits.verdict import Drop
from mipbits.nodeconfig import NodeConfig, load_node_config
from mipbits.render import render_status, render_status_json, trace_tail, use_colour

DEFAULT_STATE_DIR = "/var/lib/mipbits/seq"


def _fail(exc: Exception) -> None:
    click.echo(f"mipbits: error: {exc}", err=True)
    sys.exit(2)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mipbits")
def main() -> None:
    """Mobile IPv6 / DSMIPv6 over an unmodified userspace IPsec (ESP on NFQUEUE)."""


# --- offline IPsec ------------------------------------------------------------------------------


@main.group()
def ipsec() -> None:
    """Offline ESP processing of pcap captures with a setkey-style SA/SP file."""


def _offline_engine(sa_file: str, local: tuple[str, ...], state_dir: str) -> Engine:
    cfg = load_setkey(sa_file, local_addresses=local or None)
    for w in cfg.warnings:
        click.echo(f"mipbits: warning: {w}", err=True)
    reserver = FileSeqReserver(state_dir)
    return build_engine(cfg, rand=os.urandom, now=time.monotonic(), reserver=reserver)


def _offline(direction: str, sa_file: str, local: tuple[str, ...], state_dir: str, src: str, dst: str) -> None:
    try:
        engine = _offline_engine(sa_file, local, state_dir)

        def report(index: int, drop: Drop) -> None:
            spi = f" spi=0x{drop.spi:08x}" if drop.spi is not None else ""
            seq = f" seq={drop.seq}" if drop.seq is not None else ""
            detail = f" ({drop.detail})" if drop.detail else ""
            click.echo(f"frame {index}: dropped: {drop.reason.value}{spi}{seq}{detail}", err=True)

        rep = process_capture(engine, direction, src, dst, report)
    except (BitsError, OSError) as exc:
        _fail(exc)
        return
    summary = f"{rep.written} written ({rep.transformed} {direction}ed, {rep.passed} passed), {rep.dropped} dropped"
    if rep.drops:
        summary += ": " + ", ".join(f"{k} {v}" for k, v in sorted(rep.drops.items()))
    click.echo(summary, err=True)


_sa_opt = click.option("--sa", "sa_file", required=True, type=click.Path(dir_okay=False),
                       help="setkey-syntax file with SAs and policies (mode 0600)")
_local_opt = click.option("--local", multiple=True, metavar="ADDR",
                          help="this node's address (repeatable): tells inbound SAs from outbound ones")
_state_opt = click.option("--state-dir", default=DEFAULT_STATE_DIR, show_default=True,
                          help="where outbound sequence numbers are reserved (no IV is ever reused)")


@ipsec.command()
@_sa_opt
@_local_opt
@_state_opt
@click.argument("src", type=click.Path(exists=True, dir_okay=False))
@click.argument("dst", type=click.Path(dir_okay=False))
def encrypt(sa_file: str, local: tuple[str, ...], state_dir: str, src: str, dst: str) -> None:
    """Apply outbound processing (SPD-O, ESP) to every packet of SRC; write DST."""
    _offline("encrypt", sa_file, local, state_dir, src, dst)


@ipsec.command()
@_sa_opt
@_local_opt
@_state_opt
@click.argument("src", type=click.Path(exists=True, dir_okay=False))
@click.argument("dst", type=click.Path(dir_okay=False))
def decrypt(sa_file: str, local: tuple[str, ...], state_dir: str, src: str, dst: str) -> None:
    """Apply inbound processing (ESP, SPD-I checks) to every packet of SRC; write DST."""
    _offline("decrypt", sa_file, local, state_dir, src, dst)


# --- the processor ------------------------------------------------------------------------------


def _config(path: str) -> NodeConfig:
    try:
        return load_node_config(path)
    except BitsError as exc:
        _fail(exc)
        raise  # unreachable


def system_addresses() -> list[str]:
    """This host's (this namespace's) addresses, from ``ip -j addr``."""
    out = subprocess.run(["ip", "-j", "addr", "show"], capture_output=True, text=True, check=True).stdout
    return [a["local"] for link in json.loads(out) for a in link.get("addr_info", []) if "local" in a]


def node_local_addresses(cfg: NodeConfig) -> list[str]:
    """Addresses that tell this node's inbound SAs from its outbound ones: the system's plus, for a
    mobile node, its home addresses (not assigned while it is away) and, for a home agent, its
    configured address."""
    own = {"mn": ("hoa", "ipv4_hoa"), "ha": ("address", "ipv4_address")}.get(cfg.role, ())
    section = cfg.sections.get(cfg.role, {}) if cfg.sections else {}
    return system_addresses() + [str(section[k]) for k in own if k in section]


def load_ipsec(cfg: NodeConfig) -> IpsecConfig:
    if cfg.sa_file is None:
        raise BitsError(f"{cfg.path}: [ipsec] sa_file is required to run the engine")
    return load_setkey(cfg.sa_file, local_addresses=node_local_addresses(cfg))


def engine_factory(cfg: NodeConfig):  # type: ignore[no-untyped-def]
    """``(tracer, direction) -> Engine`` for the NFQUEUE processor, with durable sequence numbers
    and a SIGHUP reload that keeps the state of unchanged SAs."""
    reserver = FileSeqReserver(cfg.state_dir)

    def factory(tracer: Tracer, direction: Direction | None) -> Engine:
        ipsec_cfg = load_ipsec(cfg)
        engine = build_engine(ipsec_cfg, rand=os.urandom, now=time.monotonic(), reserver=reserver, tracer=tracer)

        def reload() -> None:
            engine.reconfigure(load_ipsec(cfg), rand=os.urandom, now=time.monotonic(), reserver=reserver)

        engine.reload = reload  # type: ignore[attr-defined]
        return engine

    return factory


@main.command()
@click.option("-c", "--config", "config_path", required=True, type=click.Path(dir_okay=False),
              help="the node's NODE.toml")
@click.option("--mode", type=click.Choice(["api", "heuristic"]), default=None,
              help="(DS)MIPv6 tunnel code: ask the engine (api) or infer (heuristic); default from config")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False))
def run(config_path: str, mode: str | None, log_level: str) -> None:
    """Run the node: the IPsec processor (and, for role mn/ha, the mobility module beside it)."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    cfg = _config(config_path)
    try:
        if cfg.role == "ipsec":
            load_ipsec(cfg)  # configuration errors stop start-up here, with file and line
            sys.exit(run_processor(cfg, engine_factory(cfg)))
        from mipbits.mobility_run import run_mobility_node  # the mobility module (role mn/ha)

        sys.exit(run_mobility_node(cfg, mode, engine_factory(cfg)))
    except BitsError as exc:
        _fail(exc)


# --- rules ----------------------------------------------------------------------------------------


@main.group()
def rules() -> None:
    """Install, remove or show the node's iptables/ip6tables rules."""


_cfg_opt = click.option("-c", "--config", "config_path", required=True, type=click.Path(dir_okay=False))


def _rules_action(config_path: str, action) -> None:  # type: ignore[no-untyped-def]
    try:
        out = action(_config(config_path))
    except BitsError as exc:
        _fail(exc)
        return
    if isinstance(out, str):
        click.echo(out, nl=False)


@rules.command("install")
@_cfg_opt
def rules_install_cmd(config_path: str) -> None:
    """Install the rules (idempotent). Protected traffic fails closed until `mipbits run` binds."""
    _rules_action(config_path, rules_install)


@rules.command("remove")
@_cfg_opt
def rules_remove_cmd(config_path: str) -> None:
    """Remove the rules, restoring the ruleset as it was before `install`."""
    _rules_action(config_path, rules_remove)


@rules.command("show")
@_cfg_opt
def rules_show_cmd(config_path: str) -> None:
    """Print the rules and whether they are installed."""
    _rules_action(config_path, rules_show)


# --- status, queries, trace -----------------------------------------------------------------------


def _socket_path(config_path: str | None, socket_path: str | None) -> str:
    if socket_path:
        return socket_path
    if config_path:
        return _config(config_path).control_socket
    raise click.UsageError("give -c NODE.toml or --socket PATH")


@main.command()
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False))
@click.option("--socket", "socket_path", help="control socket (default: from the config)")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def status(config_path: str | None, socket_path: str | None, as_json: bool) -> None:
    """SAs, policies, drops and (for mn/ha) the binding cache or binding update list."""
    path = _socket_path(config_path, socket_path)
    try:
        st: dict[str, Any] = control_request(path, "status")
    except (ControlError, OSError) as exc:
        _fail(exc)
        return
    mobility = _mobility_status(config_path)
    if mobility is not None:
        st["mobility"] = mobility
    if as_json:
        click.echo(render_status_json(st), nl=False)
        return
    click.echo(render_status(st, colour=use_colour(sys.stdout)), nl=False)
    if mobility is not None:
        from mipbits.mobility_run import render_mobility_status

        click.echo(render_mobility_status(mobility), nl=False)


def _mobility_status(config_path: str | None) -> dict[str, Any] | None:
    if not config_path:
        return None
    cfg = _config(config_path)
    if cfg.role == "ipsec":
        return None
    try:
        return control_request(cfg.control_socket + ".mobility", "status")  # type: ignore[no-any-return]
    except (ControlError, OSError) as exc:
        return {"error": str(exc)}


@main.group()
def query() -> None:
    """Ask the running engine what the draft's tunnel code asks (RFC 4301 SPD/SAD queries)."""


@query.command("inbound-spi")
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False))
@click.option("--socket", "socket_path")
@click.argument("spi")
def query_inbound_spi_cmd(config_path: str | None, socket_path: str | None, spi: str) -> None:
    """The traffic selectors of the inbound SA SPI (hex 0x.. or decimal)."""
    try:
        result = control_request(_socket_path(config_path, socket_path), "query_inbound_spi", spi=int(spi, 0))
    except (ControlError, OSError, ValueError) as exc:
        _fail(exc)
        return
    click.echo(json.dumps(result, indent=2, sort_keys=True))


@main.group()
def trace() -> None:
    """Read the packet trace (JSON Lines, rotated by size)."""


@trace.command("tail")
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False))
@click.option("--file", "trace_file", type=click.Path(dir_okay=False), help="trace file (default: from the config)")
@click.option("-f", "--follow", is_flag=True, help="keep printing new events (follows rotation)")
@click.option("-n", "--lines", default=20, show_default=True, help="events of backlog to print")
@click.option("--spi", help="only this SPI (hex or decimal)")
@click.option("--event", "events", multiple=True, help="only these events (encap, decap, drop, ...)")
@click.option("--addr", help="only events with this address (or prefix) inner or outer")
@click.option("--json", "as_json", is_flag=True, help="raw JSON lines")
def trace_tail_cmd(config_path: str | None, trace_file: str | None, follow: bool, lines: int, spi: str | None,
                   events: tuple[str, ...], addr: str | None, as_json: bool) -> None:
    """Print the last events of the packet trace, then (-f) follow it."""
    if trace_file is None:
        if config_path is None:
            raise click.UsageError("give -c NODE.toml or --file PATH")
        trace_file = _config(config_path).trace.path
    if trace_file is None:
        _fail(BitsError("tracing is off in this node's configuration ([trace] path)"))
        return
    try:
        trace_tail(trace_file, follow=follow, lines=lines, spi=spi, event=list(events) or None, addr=addr,
                   as_json=as_json)
    except KeyboardInterrupt:
        pass
    except (BitsError, OSError) as exc:
        _fail(exc)


if __name__ == "__main__":  # pragma: no cover
    main()
