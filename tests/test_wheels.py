"""The wheels and the sdist of ``scripts/build-wheels.sh``, as a user meets them.

``scripts/build-wheels.sh`` runs once per session (two release builds: the
costly part) and every test shares its output. For each CPython that pyenv has
here (of 3.10 to 3.13; 3.11, the machine's own, must be one), the wheel pip
would pick (cp310 on 3.10, the abi3 one from 3.11 on) is installed with
``--only-binary=:all:`` into a fresh venv whose PATH has no cargo or rustc,
and the command, the demo script, the API (one verify,
with the GIL released) and ``python -m blkverify_rs`` run from that venv. The
wheels' tags, ``auditwheel show`` and the extension's dynamic links are checked
against the manylinux policy; the sdist is installed into a fresh venv (pip
builds it with cargo) and imported.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VERSION = re.search(r'^version = "([^"]+)"', (ROOT / "Cargo.toml").read_text(), re.M)[1]
PYTHONS = ["3.10", "3.11", "3.12", "3.13"]
MiB = 1 << 20
# The dynamic loader: named by every glibc binary, allowed by every policy.
LOADER = "ld-linux-x86-64.so.2"


def cpython(version: str) -> Path | None:
    """pyenv's CPython ``version`` (or ``pythonX.Y`` on PATH, if it runs)."""
    root = os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")
    found = sorted(glob.glob(f"{root}/versions/{version}.*/bin/python{version}"))
    on_path = shutil.which(f"python{version}")
    for cand in [*reversed(found), on_path]:
        if cand and subprocess.run([cand, "-c", ""], capture_output=True).returncode == 0:
            return Path(cand)
    return None


def find_cpython(version: str) -> Path:
    found = cpython(version)
    if found is None:
        pytest.fail(f"no CPython {version} here (looked in pyenv's versions and on PATH)")
    return found


# The CPythons the venv tests install into: those of 3.10 to 3.13 that this
# machine has. pyenv builds CPython from python.org's sources, which a CI
# machine may not reach (.ci/run tries); 3.11 is the machine's own and always
# runs, so the abi3 wheel is always installed and run. The cp310 wheel's tags,
# links and auditwheel report are checked whether or not a 3.10 is here.
PRESENT = [v for v in PYTHONS if v == "3.11" or cpython(v) is not None]


def rustless_env(venv: Path) -> dict[str, str]:
    """The environment of a user without Rust, in ``venv``: PATH is the venv's
    bin, then every PATH directory that holds neither cargo nor rustc."""
    drop = ("CARGO", "RUSTUP", "RUSTC", "PYO3", "MATURIN", "PYTHON", "VIRTUAL_ENV")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    keep = [
        d
        for d in os.environ.get("PATH", "").split(os.pathsep)
        if d and not any(os.path.exists(os.path.join(d, tool)) for tool in ("cargo", "rustc"))
    ]
    env["PATH"] = os.pathsep.join([str(venv / "bin"), *keep])
    env["VIRTUAL_ENV"] = str(venv)
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def run(argv, env=None, cwd=None, timeout=600) -> subprocess.CompletedProcess:
    """Run ``argv``; raise with its output unless it exits 0."""
    proc = subprocess.run(
        [str(a) for a in argv], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"{argv} exited {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\n"
            f"stderr:\n{proc.stderr[-4000:]}"
        )
    return proc


def wheel_tags(wheel: Path) -> tuple[str, str, list[str]]:
    """(python tag, ABI tag, platform tags) of a wheel's file name."""
    _name, _version, python, abi, platforms = wheel.name[: -len(".whl")].split("-")
    return python, abi, platforms.split(".")


def manylinux_minor(platforms: list[str]) -> int:
    """The glibc minor version of the oldest ``manylinux_2_N_x86_64`` tag."""
    minors = [int(m[1]) for p in platforms if (m := re.fullmatch(r"manylinux_2_(\d+)_x86_64", p))]
    assert minors, f"no manylinux_2_N_x86_64 tag in {platforms}"
    return min(minors)


# --------------------------------------------------------------------------------------------
# built once per session
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def dist(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """scripts/build-wheels.sh's output: the abi3 wheel, the cp310 wheel and the sdist."""
    out = tmp_path_factory.mktemp("dist")
    env = dict(os.environ)
    # The script's python3 is this interpreter: its build tools land here.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    run(["sh", ROOT / "scripts" / "build-wheels.sh", out], env=env, timeout=3600)
    files = sorted(p.name for p in out.iterdir())
    found = {
        "abi3": [p for p in out.glob("*.whl") if "-abi3-" in p.name],
        "cp310": [p for p in out.glob("*-cp310-cp310-*.whl")],
        "sdist": [p for p in out.glob("*.tar.gz")],
    }
    assert all(len(v) == 1 for v in found.values()), files
    assert len(files) == 3, files
    return {k: v[0] for k, v in found.items()}


@pytest.fixture(scope="session")
def gil_images(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, int]:
    """A 256 MiB qcow2 full of data and its raw copy, by QEMU's tools: a
    verify long enough for another thread to run many times meanwhile."""
    d = tmp_path_factory.mktemp("gil")
    size = 256 * MiB
    test, raw = d / "test.qcow2", d / "raw.img"
    run(["qemu-img", "create", "-q", "-f", "qcow2", test, str(size)])
    run(["qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a 0 {size}", test])
    run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", test, raw])
    return raw, test, size


class Venv:
    def __init__(self, path: Path, version: str, wheel: Path) -> None:
        self.path, self.version, self.wheel = path, version, wheel
        self.python = path / "bin" / "python"
        self.env = rustless_env(path)

    def run(self, *argv, cwd=None, timeout=600) -> subprocess.CompletedProcess:
        return run(argv, env=self.env, cwd=cwd, timeout=timeout)


@pytest.fixture(scope="session", params=PRESENT)
def venv(request: pytest.FixtureRequest, dist, tmp_path_factory) -> Venv:
    """A fresh venv of CPython ``param``, no Rust on its PATH, where pip
    installed blkverify-rs from the build's directory, binaries only: pip
    picks the wheel (cp310 on 3.10, abi3 from 3.11 on), and has no sdist
    to fall back to."""
    version = request.param
    path = tmp_path_factory.mktemp(f"venv-{version}")
    run([find_cpython(version), "-m", "venv", path])
    v = Venv(path, version, dist["cp310"] if version == "3.10" else dist["abi3"])
    no_rust = "import shutil; print(shutil.which('cargo'), shutil.which('rustc'))"
    assert v.run(v.python, "-c", no_rust).stdout.split() == ["None", "None"]
    pip = [v.python, "-m", "pip", "install", "--quiet", "--only-binary=:all:"]
    # click from the index; blkverify-rs only from the build (no index: a
    # project of that name on the index is never a candidate).
    v.run(*pip, "click>=8.1")
    v.run(*pip, "--no-index", "--find-links", v.wheel.parent, f"blkverify-rs=={VERSION}")
    installed = v.run(v.python, "-m", "pip", "show", "--files", "blkverify-rs").stdout
    assert f"Version: {VERSION}" in installed
    return v


# --------------------------------------------------------------------------------------------
# each CPython, from its venv
# --------------------------------------------------------------------------------------------


def test_the_extension_is_the_wheels_for_this_python(venv: Venv) -> None:
    code = (
        "import blkverify_rs._native as n, sys, sysconfig\n"
        "print(n.__file__, sysconfig.get_path('purelib'), '%d.%d' % sys.version_info[:2])"
    )
    so, purelib, version = venv.run(venv.python, "-c", code, cwd=venv.path).stdout.split()
    assert version == venv.version
    assert Path(so).parent == Path(purelib) / "blkverify_rs"
    suffix = "cpython-310-x86_64-linux-gnu.so" if version == "3.10" else "abi3.so"
    assert Path(so).name == f"_native.{suffix}"
    # The wheel pip installed is the one expected: its WHEEL file came along.
    with zipfile.ZipFile(venv.wheel) as z:
        expected = z.read(f"blkverify_rs-{VERSION}.dist-info/WHEEL").decode()
    installed = Path(purelib) / f"blkverify_rs-{VERSION}.dist-info" / "WHEEL"
    assert installed.read_text() == expected


def test_version(venv: Venv) -> None:
    assert venv.run("blkverify", "--version").stdout == f"blkverify {VERSION}\n"
    code = "import blkverify_rs as bv; print(bv.__version__)"
    assert venv.run(venv.python, "-c", code).stdout.strip() == VERSION


def test_demo(venv: Venv) -> None:
    out = venv.run("sh", ROOT / "scripts" / "demo.sh").stdout
    # Identical first, then the flipped byte found where the demo put it.
    assert "contents mismatch in sector 10249" in out, out
    assert out.rstrip().endswith("exit status 1 (1: the images differ)"), out


# One verify through the API while a second thread counts. The switch interval
# is made huge, so a thread gets the GIL only when its holder lets it go: the
# counter moves during a call only if the call releases the GIL. A call that
# holds it (sum over a range, in C) is the control: the counter must stand still.
GIL_SCRIPT = """
import sys, threading, time
import blkverify_rs as bv

raw, test = sys.argv[1], sys.argv[2]
sys.setswitchinterval(100.0)
count = [0]
stop = threading.Event()

def counter():
    while not stop.is_set():
        count[0] += 1
        time.sleep(0.0001)  # lets the GIL go, so the main thread can take it back

thread = threading.Thread(target=counter)
thread.start()
while count[0] < 10:
    time.sleep(0.001)
before = count[0]
sum(range(30_000_000))
held = count[0] - before
before = count[0]
started = time.perf_counter()
report = bv.verify(raw, test)
seconds = time.perf_counter() - started
released = count[0] - before
stop.set()
thread.join()
print(held, released, report.identical, report.bytes_compared, round(seconds, 3))
"""


def test_api_verify_releases_the_gil(venv: Venv, gil_images) -> None:
    raw, test, size = gil_images
    out = venv.run(venv.python, "-c", GIL_SCRIPT, raw, test).stdout.split()
    held, released, identical, compared, seconds = out
    assert identical == "True" and int(compared) == size, out
    assert int(held) == 0, f"the control call let the counter run: {out}"
    assert int(released) > 0, f"the counter stood still for {seconds} s of verify: {out}"


def test_python_m_help(venv: Venv) -> None:
    out = venv.run(venv.python, "-m", "blkverify_rs", "--help").stdout
    assert out.startswith("Usage: python -m blkverify_rs [OPTIONS] COMMAND"), out
    commands = re.findall(r"^  (\w+)\s", out.split("Commands:")[1], re.M)
    assert {"batch", "create", "digest", "exercise", "io", "map", "verify"} <= set(commands)


# --------------------------------------------------------------------------------------------
# the files themselves
# --------------------------------------------------------------------------------------------


def test_wheel_tags(dist) -> None:
    for kind, expected in (("abi3", ("cp311", "abi3")), ("cp310", ("cp310", "cp310"))):
        wheel = dist[kind]
        python, abi, platforms = wheel_tags(wheel)
        assert (python, abi) == expected, wheel.name
        assert wheel.name.startswith(f"blkverify_rs-{VERSION}-")
        assert manylinux_minor(platforms) <= 28, wheel.name
        assert all(p.endswith("_x86_64") for p in platforms), wheel.name
        # The WHEEL file inside says the same as the name.
        with zipfile.ZipFile(wheel) as z:
            meta = z.read(f"blkverify_rs-{VERSION}.dist-info/WHEEL").decode()
        tags = set(re.findall(r"^Tag: (\S+)$", meta, re.M))
        assert tags == {f"{python}-{abi}-{p}" for p in platforms}, meta
        assert "Root-Is-Purelib: false" in meta


def auditwheel_show(wheel: Path) -> str:
    return run([sys.executable, "-m", "auditwheel", "show", wheel]).stdout


@pytest.mark.parametrize("kind", ["abi3", "cp310"])
def test_auditwheel_show_accepts_the_tag(dist, kind: str) -> None:
    wheel = dist[kind]
    out = " ".join(auditwheel_show(wheel).split())
    m = re.search(r'is consistent with the following platform tag: "manylinux_2_(\d+)_x86_64"', out)
    assert m, out
    # The tag in the name claims no more than auditwheel finds.
    assert int(m[1]) <= manylinux_minor(wheel_tags(wheel)[2]) <= 28, out


def extension(wheel: Path, into: Path) -> Path:
    with zipfile.ZipFile(wheel) as z:
        (name,) = [n for n in z.namelist() if n.startswith("blkverify_rs/_native") and ".so" in n]
        return Path(z.extract(name, into))


def manylinux_policy(minor: int) -> dict:
    import auditwheel

    policies = Path(auditwheel.__file__).parent / "policy" / "manylinux-policy.json"
    (policy,) = [p for p in json.loads(policies.read_text()) if p["name"] == f"manylinux_2_{minor}"]
    return policy


@pytest.mark.parametrize("kind", ["abi3", "cp310"])
def test_extension_links_nothing_outside_the_policy(dist, kind: str, tmp_path: Path) -> None:
    wheel = dist[kind]
    so = extension(wheel, tmp_path)
    policy = manylinux_policy(manylinux_minor(wheel_tags(wheel)[2]))
    dynamic = run(["readelf", "-dW", so]).stdout
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", dynamic)
    assert needed and "libc.so.6" in needed, dynamic
    outside = set(needed) - set(policy["lib_whitelist"]) - {LOADER}
    assert not outside, f"{so.name} needs {outside}, outside {policy['name']}"
    assert not [n for n in needed if n.startswith("libpython")], needed
    # Every versioned symbol it needs (GLIBC_2.17, GCC_3.0...) is one the policy allows.
    versions = run(["readelf", "-VW", so]).stdout.split(".gnu.version_r")[-1]
    wanted = set(re.findall(r"Name: ([A-Z]+)_([0-9][0-9.]*)\s", versions))
    assert ("GLIBC", "2.2.5") in wanted, versions
    allowed = policy["symbol_versions"]["x86_64"]
    too_new = {f"{k}_{v}" for k, v in wanted if v not in allowed.get(k, [])}
    assert not too_new, f"{so.name} needs {too_new}, outside {policy['name']}"
    assert not re.search(r"Name: \w*PRIVATE", versions), versions


@pytest.mark.parametrize("kind", ["abi3", "cp310"])
def test_extension_is_stripped(dist, kind: str, tmp_path: Path) -> None:
    so = extension(dist[kind], tmp_path)
    sections = run(["readelf", "-SW", so]).stdout
    assert ".dynsym" in sections, sections
    assert ".symtab" not in sections and ".debug_" not in sections, sections


def test_sdist_installs_and_imports(dist, tmp_path: Path) -> None:
    sdist = dist["sdist"]
    assert sdist.name == f"blkverify_rs-{VERSION}.tar.gz"
    venv = tmp_path / "venv"
    run([find_cpython("3.11"), "-m", "venv", venv])
    env = dict(os.environ)
    for key in [k for k in env if k.startswith(("VIRTUAL_ENV", "PYTHON"))]:
        del env[key]
    env["PATH"] = os.pathsep.join([str(venv / "bin"), env.get("PATH", "")])
    # A build cache only: the crates.io dependencies that `pip install .` already
    # compiled for this CPython are reused; the crate is compiled from the
    # sdist's own sources (another path: another cargo package).
    env["CARGO_TARGET_DIR"] = str(ROOT / "target")
    python = venv / "bin" / "python"
    run([python, "-m", "pip", "install", "--quiet", sdist], env=env, timeout=3600)
    code = "import blkverify_rs as bv, blkverify_rs._native as n; print(bv.__version__, n.__file__)"
    version, so = run([python, "-c", code], env=env, cwd=tmp_path).stdout.split()
    assert version == VERSION
    assert Path(so).is_relative_to(venv) and Path(so).name.startswith("_native.cpython-311"), so
    cli = run([venv / "bin" / "blkverify", "--version"], env=env)
    assert cli.stdout == f"blkverify {VERSION}\n"
