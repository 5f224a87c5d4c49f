"""Fill `.gpu/` (git-ignored, carried to the GPU machine) with what scripts/gpu_check.sh needs there, in the order
of value, as far as the 64 MiB upload allows:

    python -m scripts.gpu_prepare            # download, build, and print the budget arithmetic
    python -m scripts.gpu_prepare --budget   # only print what would travel now

    site.tar.xz           the wheels the GPU image lacks (datasets, dill, multiprocess: `pip download
                          --only-binary=:all: --no-deps` for CPython 3.12 on manylinux x86-64), unpacked and xz'd
                          (pure-Python wheels; 0.54 MB against 0.88 MB as wheels)
    data/                 a seeded subset of data/pairs (zstd parquet) sized to the room left: the recipe step
    flash-attn-src.tar.xz the flash-attn sdist, patched (scripts/flash-attn-2.8.3.post2-medeir.patch) and cut to the
                          files its 13 sources include (0.37 MB against 8.5 MB)

Everything else that travels is the working tree itself (tracked and untracked-not-ignored files), measured here.
"""

import argparse
import io
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path


def extract(archive: tarfile.TarFile, target: Path) -> None:
    """Unpack `archive` into `target`, refusing members that would land outside it or are not plain files and
    folders: tarfile's "data" filter where this Python has it (3.11.4 on), the same rule checked here before that."""
    if hasattr(tarfile, "data_filter"):
        archive.extractall(target, filter="data")
        return
    root = Path(target).resolve()
    for member in archive.getmembers():
        inside = (root / member.name).resolve()
        if not (member.isfile() or member.isdir()) or (inside != root and root not in inside.parents):
            raise tarfile.TarError(f"refusing {member.name!r} in the archive: not a plain file or folder under {root}")
    archive.extractall(target)


REPO = Path(__file__).resolve().parents[1]
PREPARED = REPO / ".gpu"
DOWNLOADS = REPO / "build" / "gpu-prepare"
UPLOAD_LIMIT = 64 * 2**20
MARGIN = 128 * 1024  # others' edits between now and the lease (the tree grew 145 KB in one hour here)
FLASH_VERSION = "2.8.3.post2"
PATCH = REPO / "scripts" / f"flash-attn-{FLASH_VERSION}-medeir.patch"
WHEELS = ["datasets==5.2.0", "dill==0.4.1", "multiprocess==0.70.19"]  # the versions in this venv
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]
FLASH_INCLUDE_DIRS = ["csrc/flash_attn", "csrc/flash_attn/src", "csrc/cutlass/include"]
FLASH_PYTHON = [
    "setup.py",
    "LICENSE",
    "AUTHORS",
    "README.md",
    "flash_attn/__init__.py",
    "flash_attn/flash_attn_interface.py",
]
INCLUDE = re.compile(r'^\s*#\s*include\s*[<"]([^">]+)[">]', re.M)


def tree_bytes() -> dict:
    """Bytes of what travels besides the carried folder: tracked files and untracked files git does not ignore."""

    def total(args: list[str]) -> int:
        names = subprocess.run(["git", *args, "-z"], cwd=REPO, capture_output=True, check=True).stdout.split(b"\0")
        paths = [REPO / n.decode() for n in names if n]
        return sum(p.stat().st_size for p in paths if p.is_file() and not p.is_symlink())

    return {"tracked": total(["ls-files"]), "untracked": total(["ls-files", "--others", "--exclude-standard"])}


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def pip_download(args: list[str], dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(dest), *args], check=True)


# ---- wheels ---------------------------------------------------------------------------------------------------


def download_wheels(dest: Path) -> list[Path]:
    platforms = [a for p in PLATFORMS for a in ("--platform", p)]
    pinned = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp", *platforms]
    pip_download([*pinned, *WHEELS], dest)
    return sorted(dest.glob("*.whl"))


def site_archive(wheels: list[Path], target: Path) -> None:
    """Unpack pure-Python wheels (what pip install does for them) without their test suites, as one xz tar."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:xz") as t:
        for wheel in wheels:
            if not wheel.name.endswith(("-none-any.whl",)):
                raise ValueError(f"{wheel.name} is not a pure-Python wheel; carry it as a wheel instead")
            with zipfile.ZipFile(wheel) as z:
                for info in z.infolist():
                    if info.is_dir() or re.search(r"(^|/)tests?/", info.filename):
                        continue
                    member = tarfile.TarInfo(info.filename)
                    data = z.read(info)
                    member.size = len(data)
                    t.addfile(member, io.BytesIO(data))
    target.write_bytes(buffer.getvalue())


# ---- flash-attn -----------------------------------------------------------------------------------------------


def flash_sdist(dest: Path) -> Path:
    """The PyPI sdist. Its metadata step imports torch, so it runs here without build isolation or a CUDA build."""
    found = sorted(dest.glob(f"flash_attn-{FLASH_VERSION}.tar.gz"))
    if not found:
        env_args = ["--no-binary=:all:", "--no-build-isolation", f"flash-attn=={FLASH_VERSION}"]
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(dest), *env_args],
            check=True,
            env={**os.environ, "FLASH_ATTENTION_SKIP_CUDA_BUILD": "TRUE"},
        )
        found = sorted(dest.glob(f"flash_attn-{FLASH_VERSION}.tar.gz"))
    return found[0]


def patched_tree(sdist: Path, work: Path) -> Path:
    """The sdist unpacked into `work` with the MedEIR patch applied (`patch` fails loudly if it does not apply)."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    with tarfile.open(sdist) as t:
        extract(t, work)
    root = work / f"flash_attn-{FLASH_VERSION}"
    subprocess.run(["patch", "-p1", "--forward", "--quiet", "-i", str(PATCH)], cwd=root, check=True)
    return root


def source_list(root: Path) -> list[str]:
    """The CUDA extension's sources, as the (patched) setup.py lists them."""
    text = (root / "setup.py").read_text()
    block = text[text.index('name="flash_attn_2_cuda"') :]
    block = block[block.index("sources=[") : block.index("]")]
    return re.findall(r'"(csrc/[^"]+)"', block)


def include_closure(root: Path, sources: list[str]) -> tuple[list[Path], set[str]]:
    """Every file the sources include, followed through all #include lines (conditionals too: a superset), and the
    names found nowhere in the tree (CUDA, torch and C++ system headers, present on the GPU machine)."""
    dirs = [root / d for d in FLASH_INCLUDE_DIRS]
    seen: set[Path] = set()
    missing: set[str] = set()
    todo = [root / s for s in sources]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in INCLUDE.findall(path.read_text(errors="replace")):
            found = next((b / name for b in [path.parent, *dirs] if (b / name).is_file()), None)
            if found is None:
                missing.add(name)
            else:
                todo.append(found.resolve())
    return sorted(seen), missing


def flash_archive(root: Path, target: Path) -> dict:
    sources = source_list(root)
    absent = [s for s in sources if not (root / s).is_file()]
    if absent:
        raise FileNotFoundError(f"the patched source list names files the sdist lacks: {absent}")
    files, missing = include_closure(root, sources)
    unexpected = sorted(n for n in missing if n.startswith(("cute/", "cutlass/", "flash", "src/")))
    if unexpected:
        raise FileNotFoundError(f"includes of the sources not found in the sdist: {unexpected}")
    base = root.parent.resolve()
    with tarfile.open(target, "w:xz") as t:
        for path in files + [root / p for p in FLASH_PYTHON]:
            t.add(path, arcname=str(path.resolve().relative_to(base)))
    return {"sources": len(sources), "files": len(files) + len(FLASH_PYTHON), "bytes": target.stat().st_size}


# ---- data -----------------------------------------------------------------------------------------------------


def data_subset(source: Path, target: Path, max_bytes: int, recipe: Path, seed: int = 0) -> dict:
    """A seeded sample of the training pairs the recipe reads (its `pair_kinds`, else every kind; at most its
    `pair_rows`), in the build's own proportions, as large as fits `max_bytes`, with at least one row of each kind.

    No validation pairs: they feed only the monitoring evaluator, which a run of a few dozen steps never reaches
    (eval_steps 200), and the room is better spent on training rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml

    pairs = pq.read_table(source / "pairs" / "train.parquet", columns=["kind", "anchor", "positive", "negatives"])
    settings = yaml.safe_load(recipe.read_text()) or {}
    wanted = set(settings.get("pair_kinds") or [])
    kinds = pairs.column("kind").to_pylist()
    rng = random.Random(seed)
    by_kind: dict[str, list[int]] = {}
    for i, kind in enumerate(kinds):
        if not wanted or kind in wanted:
            by_kind.setdefault(kind, []).append(i)
    for rows in by_kind.values():
        rng.shuffle(rows)
    total = sum(len(rows) for rows in by_kind.values())
    share = min(1.0, (settings.get("pair_rows") or total) / total)  # the recipe's own sample, at most
    caps = {k: len(rows) * share for k, rows in by_kind.items()}

    def write(fraction: float) -> int:
        keep = sorted(i for k, rows in by_kind.items() for i in rows[: max(1, round(caps[k] * fraction))])
        shutil.rmtree(target, ignore_errors=True)
        (target / "pairs").mkdir(parents=True)
        zstd = {"compression": "zstd", "compression_level": 19}
        pq.write_table(pairs.take(pa.array(keep)), target / "pairs" / "train.parquet", **zstd)
        return folder_bytes(target)

    low, high = 0.0, 1.0
    if write(high) > max_bytes:
        for _ in range(12):  # bisect the fraction of the recipe's rows that fits
            middle = (low + high) / 2
            low, high = (middle, high) if write(middle) <= max_bytes else (low, middle)
        size = write(low)
        if size > max_bytes:
            shutil.rmtree(target)
            return {"status": f"skipped: even one row per kind takes {size} bytes > {max_bytes}"}
    rows = pq.read_metadata(target / "pairs" / "train.parquet").num_rows
    return {
        "status": "ok",
        "rows": rows,
        "of_recipe_rows": round(sum(caps.values())),
        "kinds": sorted(by_kind),
        "bytes": folder_bytes(target),
    }


# ---- main -----------------------------------------------------------------------------------------------------


def budget_lines(items: dict[str, int]) -> list[str]:
    tree = tree_bytes()
    used = tree["tracked"] + tree["untracked"] + sum(items.values())
    lines = [f"{'tracked files':<34}{tree['tracked']:>12,}", f"{'untracked, not ignored':<34}{tree['untracked']:>12,}"]
    lines += [f"{'.gpu/' + name:<34}{size:>12,}" for name, size in items.items()]
    lines.append(f"{'total':<34}{used:>12,}  of {UPLOAD_LIMIT:,} (64 MiB): {UPLOAD_LIMIT - used:,} left")
    return lines


def room_left() -> int:
    """Bytes .gpu/ may still grow by: the limit less the tree, what .gpu/ holds, the margin and the manifest."""
    tree = tree_bytes()
    return UPLOAD_LIMIT - MARGIN - tree["tracked"] - tree["untracked"] - folder_bytes(PREPARED) - 4096


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", action="store_true", help="only print the arithmetic for what is in .gpu/ now")
    parser.add_argument("--data", type=Path, default=REPO / "data", help="the data build to take the subset from")
    parser.add_argument("--recipe", type=Path, default=REPO / "train" / "recipes" / "finetune-small.yaml")
    parser.add_argument("--no-flash", action="store_true", help="leave the flash-attn source out")
    args = parser.parse_args()
    if not args.budget:
        shutil.rmtree(PREPARED, ignore_errors=True)
        PREPARED.mkdir()
        manifest: dict = {}
        site_archive(download_wheels(DOWNLOADS / "wheels"), PREPARED / "site.tar.xz")
        manifest["site.tar.xz"] = {"wheels": WHEELS, "bytes": (PREPARED / "site.tar.xz").stat().st_size}
        # flash-attn is all-or-nothing and small; the data subset is elastic, so it takes whatever room is left
        if not args.no_flash:
            root = patched_tree(flash_sdist(DOWNLOADS), DOWNLOADS / "flash-attn")
            flash = flash_archive(root, DOWNLOADS / "flash-attn-src.tar.xz")
            if flash["bytes"] <= room_left():
                shutil.copy(DOWNLOADS / "flash-attn-src.tar.xz", PREPARED / "flash-attn-src.tar.xz")
                manifest["flash-attn-src.tar.xz"] = flash
            else:
                manifest["flash-attn-src.tar.xz"] = {"status": f"skipped: {flash['bytes']} bytes > {room_left()} left"}
        room = room_left()
        if (args.data / "pairs" / "train.parquet").exists() and room > 0:
            manifest["data"] = data_subset(args.data, PREPARED / "data", room, args.recipe)
        else:
            manifest["data"] = {"status": f"skipped: no {args.data}/pairs/train.parquet or no room ({room} bytes)"}
        (PREPARED / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        print(json.dumps(manifest, indent=2))
    items = {p.name: (folder_bytes(p) if p.is_dir() else p.stat().st_size) for p in sorted(PREPARED.iterdir())}
    print("\n".join(budget_lines(items)))


if __name__ == "__main__":
    main()
