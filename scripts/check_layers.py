"""Check that the house's arrows point down: every ``crate::``/``super::`` path
in the Rust core names a module of a lower layer (or of its own module), and
the Python package's imports form no cycle.

    python scripts/check_layers.py [--rust] [--python] [ROOT]

Exits 1 and prints one line per wrong arrow. With neither flag, checks both.
docs/layout.md draws the layers; ``LAYERS`` below is the table the check uses,
and the two must agree.

Rust rules:

- ``LAYERS`` lists the crate's top-level modules from the bottom up. A module
  may use modules of lower layers, and its own (its own top-level module:
  ``driver::qcow2`` may use ``driver::cache``). A module of the same layer is
  beside it, not below it: no arrows between them (verify does not use digest).
- A top-level module that is not in ``LAYERS`` fails the check: a new module is
  placed in a layer on purpose, by adding it here and to docs/layout.md.
- Inside ``driver/``, a format (one folder or file per format) may use what the
  formats share at ``driver/`` level (``driver::open`` and ``open_in_chain``
  included, which open other images), never another format. The NBD wire
  protocol is not part of the driver layer: it is ``src/nbd/``, beside
  storage, so that the client and the server can share it.
- The crate root (lib.rs) is the crate's face: it re-exports from every layer
  and is not checked. Paths in comments and strings are not arrows.

Python rule: the modules of ``python/blkverify_rs`` import one another (at the
top, inside functions, or by name through ``importlib``) without a cycle.
``from blkverify_rs import NAME`` where NAME is not a module is an import of
the package's ``__init__``. Imports under ``if TYPE_CHECKING:`` do not run and
do not count.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

# The Rust layers, bottom first. Names in one tuple are beside each other.
LAYERS: list[tuple[str, ...]] = [
    ("error", "size", "compare", "bytes"),
    # Storage, and the NBD wire protocol the client and the server share.
    ("storage", "nbd"),
    ("driver",),
    # What the whole-image engines share: the worker pool and the report types.
    ("pool", "report"),
    ("verify", "digest", "map"),
    # A batch runs the verify or the digest engine for each pair.
    ("batch",),
    # The mirrored device, with the rule that orders overlapping requests.
    ("blkverify",),
    # The op log and the trace: their formats, and the device's observer
    # that records a trace.
    ("record",),
    # The NBD server (it records traces through the device's observer).
    ("serve",),
    # The workloads: seeded, or replayed from a record. A trace's requests
    # mean what serve made them mean (its checked block status), so exercise
    # sits above serve.
    ("exercise",),
    # The bindings, and the fuzzing harness (used by fuzz/ and its regressions).
    ("python", "fuzzing"),
]

# What the formats share, at driver/ level.
DRIVER_SHARED = {"gate", "locks", "cache", "read"}
# One folder or file per format (nbd: the NBD client).
DRIVER_FORMATS = {"raw", "qcow2", "vmdk", "vhdx", "vpc", "vdi", "nbd"}


@dataclass(frozen=True)
class Arrow:
    """A use of module ``target`` by module ``source``, at ``file:line``."""

    source: tuple[str, ...]
    target: tuple[str, ...]
    file: str
    line: int


def strip_rust(text: str) -> str:
    """The source with comments, strings and char literals blanked (newlines
    kept, so line numbers stay)."""
    out = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            out.append(" " * (j - i))
            i = j
        elif text.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if text.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif text.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            out.append(re.sub(r"[^\n]", " ", text[i:j]))
            i = j
        elif c == "r" and re.match(r'r#*"', text[i:]) and not re.match(r"\w", text[i - 1 : i]):
            hashes = re.match(r"r(#*)\"", text[i:]).group(1)
            end = text.find('"' + hashes, i + 2 + len(hashes))
            j = n if end < 0 else end + 1 + len(hashes)
            out.append(re.sub(r"[^\n]", " ", text[i:j]))
            i = j
        elif c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append(re.sub(r"[^\n]", " ", text[i : j + 1]))
            i = j + 1
        elif c == "'":
            # A char literal ('a', '\n', '\u{1F600}'), not a lifetime ('a).
            m = re.match(r"'(\\u\{[0-9a-fA-F]+\}|\\.|[^\\'])'", text[i:])
            if m:
                out.append(" " * len(m.group(0)))
                i += len(m.group(0))
            else:
                out.append(c)
                i += 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def module_of(src: Path, file: Path) -> tuple[str, ...]:
    """The module path of ``file`` (``src/driver/qcow2/mod.rs``: driver, qcow2)."""
    parts = list(file.relative_to(src).with_suffix("").parts)
    if parts[-1] in ("mod", "lib"):
        parts.pop()
    return tuple(parts)


def use_paths(tree: str) -> Iterator[str]:
    """The full paths a ``use`` tree names (``a::{b, c::{d, e}}``)."""
    tree = re.sub(r"\s+", "", tree)

    def split_top(s: str) -> list[str]:
        parts, depth, cur = [], 0, ""
        for ch in s:
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
            if ch == "," and depth == 0:
                parts.append(cur)
                cur = ""
            else:
                cur += ch
        if cur:
            parts.append(cur)
        return parts

    def walk(prefix: str, s: str) -> Iterator[str]:
        if "{" in s:
            head, _, rest = s.partition("{")
            inner = rest[: rest.rfind("}")]
            for part in split_top(inner):
                yield from walk(prefix + head, part)
        else:
            yield prefix + re.sub(r"\bas\w+$", "", s.split(" as ")[0])

    yield from walk("", tree)


PATH = re.compile(r"(?<![\w:])((?:crate|super|self)(?:::(?:\w+|\*))+)")
USE = re.compile(r"\buse\s+([^;]+);", re.S)
INLINE_MOD = re.compile(r"\bmod\s+(\w+)\s*\{")


def inline_modules(text: str, module: tuple[str, ...]) -> list[tuple[int, tuple[str, ...]]]:
    """Where each inline ``mod x { ... }`` of a file's (stripped) text starts
    and ends: (position, the module from there on). They nest inside the
    file's module, so a ``tests`` module's ``super`` is the file's module."""
    mods = {m.end() - 1: m.group(1) for m in INLINE_MOD.finditer(text)}
    changes: list[tuple[int, tuple[str, ...]]] = []
    stack: list[tuple[int, tuple[str, ...]]] = []
    depth, current = 0, module
    for i, ch in enumerate(text):
        if ch == "{":
            if i in mods:
                stack.append((depth, current))
                current = (*current, mods[i])
                changes.append((i, current))
            depth += 1
        elif ch == "}":
            depth -= 1
            if stack and stack[-1][0] == depth:
                _, current = stack.pop()
                changes.append((i, current))
    return changes


def scope_at(pos: int, module: tuple[str, ...], changes: list) -> tuple[str, ...]:
    """The module the code at ``pos`` belongs to (see ``inline_modules``)."""
    found = module
    for at, mod in changes:
        if at > pos:
            break
        found = mod
    return found


def rust_arrows(src: Path) -> Iterator[Arrow]:
    """Every module path used in ``src``, resolved to the crate's module tree."""
    for file in sorted(src.rglob("*.rs")):
        module = module_of(src, file)
        text = strip_rust(file.read_text())
        changes = inline_modules(text, module)
        seen: set[tuple[int, str]] = set()
        for m in USE.finditer(text):
            for path in use_paths(m.group(1)):
                if path.startswith(("crate::", "super::", "self::")):
                    seen.add((m.start(1), path))
        # Paths written in code, outside the use statements just read.
        rest = USE.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), text)
        for m in PATH.finditer(rest):
            seen.add((m.start(1), m.group(1)))
        for pos, path in sorted(seen):
            target = resolve(scope_at(pos, module, changes), path)
            if target is not None:
                line = text.count("\n", 0, pos) + 1
                yield Arrow(module, target, str(file), line)


def resolve(module: tuple[str, ...], path: str) -> tuple[str, ...] | None:
    """The crate path ``path`` names when written in ``module`` (None for the
    crate root itself)."""
    parts = path.split("::")
    if parts[0] == "crate":
        out = parts[1:]
    else:
        base = list(module)
        while parts and parts[0] in ("super", "self"):
            if parts.pop(0) == "super":
                if not base:
                    return None
                base.pop()
        out = base + parts
    out = [p for p in out if p not in ("*", "self")]
    return tuple(out) or None


def layer_of(path: tuple[str, ...]) -> tuple[int, str] | None:
    """The layer index and unit (top-level module, or the wire module) of a
    module path; None if its top-level module is in no layer."""
    for index, names in enumerate(LAYERS):
        if path[0] in names:
            return index, path[0]
    return None


def rust_problems(src: Path) -> list[str]:
    """One line per arrow that breaks the layering rules."""
    problems: set[str] = set()
    top_level = {module_of(src, f)[:1] for f in src.rglob("*.rs")} - {()}
    driver_modules = {
        module[1]
        for module in (module_of(src, f) for f in src.rglob("*.rs"))
        if module[:1] == ("driver",) and len(module) > 1
    }
    for name in sorted(driver_modules - DRIVER_FORMATS - DRIVER_SHARED):
        problems.add(
            f"src/driver/{name}: driver::{name} is neither a format nor shared at driver/ "
            "level: place it in scripts/check_layers.py's DRIVER_FORMATS or DRIVER_SHARED"
        )
    for (name,) in sorted(top_level):
        if layer_of((name,)) is None:
            problems.add(
                f"src/{name}: module '{name}' is in no layer: place it in "
                "scripts/check_layers.py's LAYERS and in docs/layout.md"
            )
    for arrow in rust_arrows(src):
        if not arrow.source:
            continue
        where = f"{arrow.file}:{arrow.line}"
        src_layer, dst_layer = layer_of(arrow.source), layer_of(arrow.target)
        if src_layer is None or dst_layer is None:
            continue  # reported above (or a path into a module that is gone)
        if src_layer[1] == dst_layer[1]:
            problem = driver_problem(arrow.source, arrow.target)
            if problem:
                problems.add(f"{where}: {problem}")
            continue
        if dst_layer[0] >= src_layer[0]:
            kind = "sideways" if dst_layer[0] == src_layer[0] else "upward"
            problems.add(
                f"{where}: {'::'.join(arrow.source)} uses {'::'.join(arrow.target)}, "
                f"an arrow {kind} ({src_layer[1]} is in layer {src_layer[0]}, "
                f"{dst_layer[1]} in layer {dst_layer[0]})"
            )
    return sorted(problems)


def driver_problem(source: tuple[str, ...], target: tuple[str, ...]) -> str | None:
    """Within driver/: a format that uses another format."""
    if source[0] != "driver" or target[0] != "driver" or len(source) < 2 or len(target) < 2:
        return None
    src, dst = source[1], target[1]
    if src in DRIVER_FORMATS and dst in DRIVER_FORMATS and src != dst:
        return (
            f"{'::'.join(source)} uses {'::'.join(target)}, an arrow sideways between "
            "two formats: what formats share belongs at driver/ level"
        )
    return None


def python_graph(package: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (``__init__`` for the package)."""
    modules = {p.stem for p in package.glob("*.py")} | {
        p.name.split(".")[0] for p in package.glob("*.so")
    }
    modules.add("_native")
    pkg = package.name
    graph: dict[str, set[str]] = {}
    for file in sorted(package.glob("*.py")):
        tree = ast.parse(file.read_text(), str(file))
        skipped: set[int] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                for child in node.body:
                    skipped.update(id(n) for n in ast.walk(child))
        deps: set[str] = set()
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            if isinstance(node, ast.Import):
                for alias in node.names:
                    parts = alias.name.split(".")
                    if parts[0] == pkg:
                        deps.add(parts[1] if len(parts) > 1 else "__init__")
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = [pkg, *(node.module or "").split(".")] if node.module else [pkg]
                else:
                    parts = (node.module or "").split(".")
                if parts[0] != pkg:
                    continue
                if len(parts) > 1 and parts[1]:
                    deps.add(parts[1])
                else:
                    for alias in node.names:
                        deps.add(alias.name if alias.name in modules else "__init__")
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                parts = node.value.split(".")
                if len(parts) == 2 and parts[0] == pkg and parts[1] in modules:
                    deps.add(parts[1])  # importlib.import_module("blkverify_rs.x")
        deps.discard(file.stem)
        graph[file.stem] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every simple import cycle of ``graph``, each as a closed path that starts
    at its smallest module name (the package is small: a plain search will do)."""
    found: list[list[str]] = []

    def search(start: str, path: list[str]) -> None:
        for w in sorted(graph.get(path[-1], ())):
            if w == start:
                found.append([*path, start])
            elif w in graph and w > start and w not in path:
                search(start, [*path, w])

    for start in sorted(graph):
        search(start, [start])
    return found


def python_problems(package: Path) -> list[str]:
    return [
        f"{package}: import cycle " + " -> ".join(cycle) for cycle in cycles(python_graph(package))
    ]


def check(root: Path, rust: bool, python: bool) -> list[str]:
    problems: list[str] = []
    if rust:
        problems += rust_problems(root / "src")
    if python:
        problems += python_problems(root / "python" / "blkverify_rs")
    return problems


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rust", action="store_true", help="check the Rust core only")
    parser.add_argument("--python", action="store_true", help="check the Python package only")
    parser.add_argument("root", nargs="?", type=Path, default=Path(__file__).resolve().parents[1])
    args = parser.parse_args(None if argv is None else list(argv))
    both = not args.rust and not args.python
    problems = check(args.root, args.rust or both, args.python or both)
    for line in problems:
        print(line)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
