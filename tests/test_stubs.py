"""_native.pyi must match the native module: every function's parameters, and
every class's methods and properties, by name and order (``*args`` and
``**kwargs`` included); a signature that cannot be read is a failure."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import blkverify_rs
import blkverify_rs._native as native

STUB = Path(blkverify_rs.__file__).with_name("_native.pyi")


def stub_tree() -> ast.Module:
    return ast.parse(STUB.read_text())


def params(fn: ast.FunctionDef) -> list[str]:
    """The parameter names in the order ``inspect.signature`` lists them."""
    a = fn.args
    names = [x.arg for x in a.posonlyargs + a.args]
    names += [a.vararg.arg] if a.vararg else []
    names += [x.arg for x in a.kwonlyargs]
    names += [a.kwarg.arg] if a.kwarg else []
    return names


# Dunders a class defines that its stub must list too (a context manager's,
# a constructor's, an iterator's).
STUBBED_DUNDERS = ("__enter__", "__exit__", "__new__", "__iter__", "__next__")


def test_py_typed_ships_beside_the_stub() -> None:
    assert STUB.exists()
    assert STUB.with_name("py.typed").exists()


def test_every_function_matches() -> None:
    functions = [n for n in stub_tree().body if isinstance(n, ast.FunctionDef)]
    assert functions
    for fn in functions:
        obj = getattr(native, fn.name)
        assert list(inspect.signature(obj).parameters) == params(fn), fn.name
    public = {n for n in dir(native) if not n.startswith("_") and callable(getattr(native, n))}
    classes = {n.name for n in stub_tree().body if isinstance(n, ast.ClassDef)}
    assert public <= {fn.name for fn in functions} | classes


def test_every_class_matches() -> None:
    for cls in [n for n in stub_tree().body if isinstance(n, ast.ClassDef)]:
        obj = getattr(native, cls.name)
        if issubclass(obj, BaseException):
            continue
        stubbed = {f.name: f for f in cls.body if isinstance(f, ast.FunctionDef)}
        actual = {n for n in vars(obj) if not n.startswith("__") or n in STUBBED_DUNDERS}
        assert set(stubbed) == actual, cls.name
        for name, fn in stubbed.items():
            attr = vars(obj)[name]
            is_property = any(
                isinstance(d, ast.Name) and d.id == "property" for d in fn.decorator_list
            )
            assert is_property == inspect.isgetsetdescriptor(attr), f"{cls.name}.{name}"
            if name == "__new__":
                # The constructor: the class's signature, without ``cls``.
                sig = inspect.signature(obj)
                assert list(sig.parameters) == params(fn)[1:], f"{cls.name}.__new__"
            elif not is_property:
                # Every method's signature must be readable, so that it is checked.
                sig = inspect.signature(getattr(obj, name))
                assert list(sig.parameters) == params(fn), f"{cls.name}.{name}"
