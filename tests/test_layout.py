"""The package layout is the architecture: wings that import downward only, one door per boundary.

These read the source (``ast``), not the running program: an import inside a function counts the
same as one at the top, and so does one under ``TYPE_CHECKING``.
"""
from __future__ import annotations

import ast
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("host_agent", "guest_shim")
LONG_MODULE = 650
# What each wing may import of host_agent, besides itself and the shared ground (errors, model,
# protobuf, hypervisor, config, inventory, and the generated _proto).
GROUND = {"host_agent", "host_agent.errors", "host_agent.model", "host_agent.protobuf", "host_agent.notify",
          "host_agent.hypervisor", "host_agent.config", "host_agent.inventory", "host_agent._proto"}
MAY_IMPORT = {
    "storage": set(),
    "tls": set(),  # certificates, credentials, roles: every network API's servers and clients
    "planning": {"tls"},
    "media": {"storage", "colocation", "tls"},  # the media service claims its moving address (serviceip)
    "colocation": {"tls"},
    "guestfiles": set(),  # it reads an NBD socket, whoever serves it
    "agent": {"storage", "media", "planning", "colocation", "guestfiles", "tls"},
    "restore": {"storage", "media", "agent"},  # whole VMs: the stored definition, views' image locks
    # vm enable/status, jobs and schedules: the agent's parts and its API; files: the reader;
    # copy: a media service's repository by its address
    "cli": {"storage", "lab", "agent", "guestfiles", "restore", "media", "tls"},
    "lab": {"agent", "storage", "colocation", "media", "tls"},
}


@cache
def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "_proto" in path.parts:
                continue
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def imported(name: str) -> set[str]:
    """The project modules ``name`` imports, wherever the import statement stands."""
    path = modules()[name]
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            names = {f"{base}.{alias.name}" for alias in node.names}
            submodules = names & modules().keys()
            out.update(submodules or {base})  # "from pkg import mod" loads mod; pkg is loading already
            out.update(names - submodules if not submodules else set())
    known = modules()
    return {m for m in out if m in known and m != name} | {
        m for m in out if m.startswith("host_agent._proto") or m == "host_agent._proto"}


def on_the_ground(module: str) -> bool:
    return module in GROUND or module.startswith("host_agent._proto.")


def wing(module: str) -> str:
    """The wing a module belongs to ("" for the ground and for what is not host_agent's)."""
    parts = module.split(".")
    return parts[1] if parts[0] == "host_agent" and len(parts) > 1 and parts[1] in MAY_IMPORT else ""


def cycles() -> Iterator[list[str]]:
    graph = {m: imported(m) & modules().keys() for m in modules()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> Iterator[list[str]]:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                yield stack[stack.index(d):] + [d]
            elif d not in state:
                yield from visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            yield from visit(m)


def test_no_module_imports_itself_back_through_others() -> None:
    assert list(cycles()) == []


@pytest.mark.parametrize("name", sorted(w for w in MAY_IMPORT))
def test_a_wing_imports_only_the_ground_and_the_wings_below_it(name: str) -> None:
    allowed = MAY_IMPORT[name] | {name}
    strays = {f"{m} -> {i}" for m in modules() if wing(m) == name for i in imported(m)
              if i.startswith("host_agent.") and not on_the_ground(i) and wing(i) not in allowed}
    assert strays == set()


def test_the_ground_imports_no_wing() -> None:
    ground = [m for m in modules() if m in GROUND]
    strays = {f"{m} -> {i}" for m in ground for i in imported(m) if wing(i)}
    assert strays == set()


def test_the_planner_loads_nothing_of_storage_not_even_through_the_ground() -> None:
    reached, todo = set(), [m for m in modules() if wing(m) == "planning"]
    while todo:
        m = todo.pop()
        if m not in reached:
            reached.add(m)
            todo.extend(i for i in imported(m) if i in modules())
    assert not {m for m in reached if wing(m) in ("storage", "media", "agent", "colocation")}


def test_the_guest_shim_needs_nothing_but_the_standard_library() -> None:
    strays = {f"{m} -> {i}" for m in modules() if m.startswith("guest_shim") for i in imported(m)
              if i.startswith("host_agent")}
    assert strays == set()


def test_libvirt_errors_are_caught_at_one_door() -> None:
    """Only host_agent.hypervisor turns libvirt's errors into the project's (the lab, a test
    harness that drives libvirt itself, is not the product)."""
    mention = {m for m, path in modules().items() if "libvirtError" in path.read_text()}
    assert {m for m in mention if not m.startswith("host_agent.lab")} == {"host_agent.hypervisor"}


def test_one_module_drives_libguestfs() -> None:
    """Only the reader talks to the appliance, and turns its errors into the project's."""
    users = {m for m in modules() if "guestfs" in imported_names(m) | plain_imports(m)}
    assert users == {"host_agent.guestfiles.reader"}


def plain_imports(name: str) -> set[str]:
    tree = ast.parse(modules()[name].read_text())
    return {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}


def test_one_module_touches_the_native_library() -> None:
    users = {m for m in modules() if "host_agent.storage._copier" in imported_names(m)}
    assert users == {"host_agent.storage.copier"}


def imported_names(name: str) -> set[str]:
    tree = ast.parse(modules()[name].read_text())
    return {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}


def test_a_long_module_says_why_at_its_top() -> None:
    """A module past ~600 lines is two concepts, unless its docstring says why it is one."""
    long = {m: len(path.read_text().splitlines()) for m, path in modules().items()}
    unexplained = {m: n for m, n in long.items() if n > LONG_MODULE
                   and "Why one module" not in (ast.get_docstring(ast.parse(modules()[m].read_text())) or "")}
    assert unexplained == {}


def test_every_package_is_installed() -> None:
    # a package missing from pyproject's list works from a checkout and breaks every real install
    import tomllib
    root = Path(__file__).resolve().parents[1]
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {str(p.parent.relative_to(root)).replace("/", ".")
             for top in ("host_agent", "guest_shim") for p in (root / top).rglob("__init__.py")}
    generated = {p for p in found if p.startswith("host_agent._proto.")}  # setup.py adds these
    assert found - generated - listed == set()
