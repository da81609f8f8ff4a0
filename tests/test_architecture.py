"""The package's shape, checked from its source: no import cycles (function-level imports
included, so a lazy import cannot hide one) and imports only in the allowed directions:

    commands -> process -> {controlplane, dataplane} -> shared (the package root)

The data plane never imports the control plane, and nothing at the root (settings, the
domain model, certificates, resolver, metrics, event log) imports either plane."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "pyroute"

# Higher layers may import lower ones, never the reverse; the two planes are siblings
# except that the control plane may read the data plane's pure helpers (never the reverse).
RANK = {"commands": 4, "process": 3, "controlplane": 2, "dataplane": 1, "shared": 0}
ALLOWED_SIBLINGS = {("controlplane", "dataplane")}


def layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in ("commands", "controlplane", "dataplane"):
        return parts[1]
    if parts[1:] == ["__main__"]:
        return "commands"
    if parts[1:] == ["process"]:
        return "process"
    return "shared"


def read_sources(root: Path = PACKAGE) -> dict[str, str]:
    """module name -> source text, for every .py file of the package."""
    sources = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        sources[".".join(parts)] = path.read_text()
    return sources


def imports_of(module: str, source: str, known: set[str]) -> set[str]:
    """The package modules that `module` imports anywhere in its body."""
    package = module if _is_package(module, known) else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if candidate in known else base)
    return {m for m in found if m in known and m != module}


def _is_package(module: str, known: set[str]) -> bool:
    return any(other.startswith(module + ".") for other in known)


def import_graph(sources: dict[str, str]) -> dict[str, set[str]]:
    known = set(sources)
    return {m: imports_of(m, src, known) for m, src in sources.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def forbidden_edges(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for src, targets in sorted(graph.items()):
        for dst in sorted(targets):
            a, b = layer(src), layer(dst)
            if a == b or (a, b) in ALLOWED_SIBLINGS:
                continue
            if RANK[a] <= RANK[b] or (a, b) == ("dataplane", "controlplane"):
                bad.append(f"{src} ({a}) imports {dst} ({b})")
    return bad


def test_the_package_has_no_import_cycle():
    found = cycles(import_graph(read_sources()))
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_imports_go_only_from_commands_to_process_to_planes_to_shared():
    bad = forbidden_edges(import_graph(read_sources()))
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_the_checks_catch_a_planted_cycle_and_a_planted_wrong_direction():
    sources = read_sources()
    planted = dict(sources)
    # a lazy import inside a function, the way the old cycles hid
    planted["pyroute.services"] += "\n\ndef _planted():\n    from pyroute.dataplane.routing import RouteTable\n"
    graph = import_graph(planted)
    assert any({"pyroute.services", "pyroute.dataplane.routing"} <= set(c) for c in cycles(graph))
    assert "pyroute.services (shared) imports pyroute.dataplane.routing (dataplane)" in forbidden_edges(graph)
    planted = dict(sources)
    planted["pyroute.dataplane.client"] += "\nfrom pyroute.controlplane import admin\n"
    assert any(e.startswith("pyroute.dataplane.client (dataplane) imports pyroute.controlplane.admin")
               for e in forbidden_edges(import_graph(planted)))


# Optional heavy libraries: RE2 (~1.5 MiB resident) serves path_reg and reqPathSearchReplace
# routes, libpass (~3.8 MiB) hashed basic-auth lists, h2 (~2.6 MiB with hpack and hyperframe)
# HTTP/2 connections; a proxy that has none of them never loads them (issue 16: RSS after start).
LAZY = ("re2", "passlib", "bcrypt", "h2", "hpack", "hyperframe")
STARTUP = "import pyroute.commands.cli, pyroute.process, pyroute.controlplane.plane, pyroute.dataplane.plane"


def _loaded_after(code: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", f"{code}\nimport sys\n"
                          f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({LAZY!r})))"],
                         capture_output=True, text=True, check=True, cwd=PACKAGE.parent)
    return ast.literal_eval(out.stdout.strip())


def test_optional_heavy_libraries_load_with_the_first_route_that_needs_them():
    assert _loaded_after(STARTUP) == []
    assert _loaded_after(STARTUP + "\nfrom pyroute.dataplane.routing import check_compiles\n"
                         "from pyroute.services import parse_service\n"
                         "check_compiles(parse_service({'serviceName': 'a', 'servicePath': '^/a/[0-9]+$', "
                         "'pathType': 'path_reg', 'port': '80'}))") == ["re2"]
    assert "passlib" in _loaded_after(STARTUP + "\nfrom pyroute.basicauth import hash_problem\n"
                                      "hash_problem('$6$salt$hash')")
    assert "h2" in _loaded_after(STARTUP + "\nimport pyroute.dataplane.http2")
