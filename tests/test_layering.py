"""The architecture, checked: the engine knows nothing of mobility, cores import no adapters.

- ``bits`` never imports ``mobility`` or ``mipbits`` (the IPsec engine stays unmodified and generic);
- ``mobility`` imports no private name of ``bits`` (only its public API) and never ``mipbits``;
- sans-I/O cores (``bits/*.py``, ``mobility/*.py``) import no adapter (``*.io``), no netfilterqueue,
  no socket/subprocess/select, and never read clocks or randomness directly;
- only ``mipbits`` (the composition root) wires both packages.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
IO_MODULES = {"subprocess", "select", "selectors", "netfilterqueue", "fcntl"}
#: the only things a core may use from ``socket``: pure address conversion
SOCKET_PURE = {"inet_ntop", "inet_pton", "AF_INET", "AF_INET6"}
CLOCK_OR_RANDOM = {("time", "time"), ("time", "monotonic"), ("os", "urandom"), ("random", "*")}


def _modules(package: str) -> list[pathlib.Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _imports(path: pathlib.Path) -> list[tuple[str, list[str]]]:
    tree = ast.parse(path.read_text(), str(path))
    out: list[tuple[str, list[str]]] = []
    pkg = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                mod = ".".join([*base, mod] if mod else base)
            out.append((mod, [a.name for a in node.names]))
    return out


def _is_core(path: pathlib.Path) -> bool:
    return "io" not in path.relative_to(ROOT).parts


@pytest.mark.parametrize("path", _modules("bits"), ids=lambda p: str(p.relative_to(ROOT)))
def test_bits_never_imports_mobility(path):
    for mod, _ in _imports(path):
        assert not mod.startswith(("mobility", "mipbits")), f"{path.name} imports {mod}"


@pytest.mark.parametrize("path", _modules("mobility"), ids=lambda p: str(p.relative_to(ROOT)))
def test_mobility_uses_only_the_public_api_of_bits(path):
    for mod, names in _imports(path):
        assert not mod.startswith("mipbits"), f"{path.name} imports the composition root"
        if mod.startswith("bits"):
            assert not any(part.startswith("_") for part in mod.split(".")), f"{path.name}: {mod}"
            assert not any(n.startswith("_") for n in names), f"{path.name} imports private {names} from {mod}"


@pytest.mark.parametrize(
    "path", [p for pkg in ("bits", "mobility") for p in _modules(pkg) if _is_core(p)],
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_cores_import_no_adapter_and_no_io(path):
    for mod, names in _imports(path):
        assert "io" not in mod.split("."), f"core {path.name} imports adapter {mod}"
        assert mod.split(".")[0] not in IO_MODULES, f"core {path.name} imports {mod}"
        for n in names or ["*"]:
            assert (mod, n) not in CLOCK_OR_RANDOM and (mod, "*") not in CLOCK_OR_RANDOM, (
                f"core {path.name} takes {mod}.{n} itself: inject the clock / randomness")


@pytest.mark.parametrize(
    "path", [p for pkg in ("bits", "mobility") for p in _modules(pkg) if _is_core(p)],
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_cores_use_socket_only_for_address_conversion(path):
    tree = ast.parse(path.read_text())
    used = {n.attr for n in ast.walk(tree)
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "socket"}
    assert used <= SOCKET_PURE, f"core {path.name} uses socket.{sorted(used - SOCKET_PURE)}"


def test_cores_call_no_clock_or_random_directly():
    """``time.time()`` / ``time.monotonic()`` / ``os.urandom()`` / ``random.*`` calls in cores."""
    offenders = []
    for pkg in ("bits", "mobility"):
        for path in filter(_is_core, _modules(pkg)):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and isinstance(
                        node.func.value, ast.Name):
                    pair = (node.func.value.id, node.func.attr)
                    if pair in {("time", "time"), ("time", "monotonic"), ("os", "urandom")} or pair[0] == "random":
                        offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {pair[0]}.{pair[1]}()")
    assert not offenders, offenders
