"""The house's arrows point down (scripts/check_layers.py; docs/layout.md draws
the layers): the Rust core's module paths never name a layer above or beside
their own, formats never use one another, and the Python package's imports
form no cycle. A self-test shows the check catches each kind of wrong arrow."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _checker():
    spec = importlib.util.spec_from_file_location("check_layers", ROOT / "scripts/check_layers.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["check_layers"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


check_layers = _checker()


def test_rust_arrows_point_down() -> None:
    problems = check_layers.check(ROOT, rust=True, python=False)
    assert problems == [], "\n".join(problems)


def test_python_imports_form_no_cycle() -> None:
    problems = check_layers.check(ROOT, rust=False, python=True)
    assert problems == [], "\n".join(problems)


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_the_check_catches_every_kind_of_wrong_arrow(tmp_path: Path) -> None:
    _write(
        tmp_path,
        {
            "src/lib.rs": "pub mod error;\npub mod driver;\npub mod verify;\n",
            # upward, written inline in code
            "src/error.rs": "fn f() -> u64 { crate::driver::SECTOR_SIZE }\n",
            "src/driver/mod.rs": "pub mod qcow2;\npub mod vmdk;\npub const SECTOR_SIZE: u64 = 9;\n",
            "src/driver/qcow2/mod.rs": "pub mod cache;\n",
            "src/driver/qcow2/cache.rs": "pub struct L2Cache;\n",
            # sideways between two formats, through a use tree
            "src/driver/vmdk/mod.rs": (
                "use super::{qcow2::cache::L2Cache, SECTOR_SIZE};\n"
                "// use crate::verify::Report; (a comment is not an arrow)\n"
                'const S: &str = "crate::verify::Report";\n'
                "#[cfg(test)]\nmod tests {\n    use super::*;\n}\n"
            ),
            # sideways between two engines
            "src/verify/mod.rs": "use crate::digest::BlockDigests;\n",
            "src/digest/mod.rs": "pub struct BlockDigests;\n",
            # a module in no layer
            "src/gadget.rs": "use crate::error::Error;\n",
        },
    )
    problems = "\n".join(check_layers.check(tmp_path, rust=True, python=False))
    assert "src/error.rs:1: error uses driver::SECTOR_SIZE, an arrow upward" in problems
    assert "vmdk/mod.rs:1: driver::vmdk uses driver::qcow2::cache::L2Cache" in problems
    assert "sideways between two formats" in problems
    assert "verify uses digest::BlockDigests, an arrow sideways" in problems
    assert "module 'gadget' is in no layer" in problems
    assert "vmdk/mod.rs:2" not in problems and "vmdk/mod.rs:3" not in problems
    assert "driver::SECTOR_SIZE, an arrow sideways" not in problems
    assert len(problems.splitlines()) == 4, problems

    pkg = tmp_path / "python" / "blkverify_rs"
    _write(
        pkg,
        {
            "__init__.py": (
                "from blkverify_rs._native import X\n\ndef f():\n    from . import a, b\n"
            ),
            "a.py": "from blkverify_rs import X\n",
            # a cycle that only TYPE_CHECKING would close does not count
            "b.py": "import typing\nif typing.TYPE_CHECKING:\n    import blkverify_rs\n",
            "c.py": "import importlib\nimportlib.import_module('blkverify_rs.d')\n",
            "d.py": "from blkverify_rs import c\n",
        },
    )
    cycles = check_layers.check(tmp_path, rust=False, python=True)
    assert [line.split(": ", 1)[1] for line in cycles] == [
        "import cycle __init__ -> a -> __init__",
        "import cycle c -> d -> c",
    ]
