"""``mipbits``: the command line and the project's one composition root.

This is the only module that reads configuration files and the environment and wires ``bits``
(the engine) and ``mobility`` together.
"""

from __future__ import annotations

import os
import sys
import time

import click

from bits.engine import Engine, build_engine
from bits.errors import BitsError
from bits.io.offline import process_capture
from bits.io.seqstore import FileSeqReserver
from bits.setkey import load_setkey
from bits.verdict import Drop

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


if __name__ == "__main__":  # pragma: no cover
    main()
