"""Recipes: training hyper-parameters live in small YAML files, read into typed dataclasses.

Every script takes `--recipe FILE` and any number of `--set key=value` overrides (values parsed as YAML, so
`--set max_steps=20 --set lr=1e-4` work), so a toy run and a full run differ only on the command line.
"""

import argparse
import dataclasses
import json
import typing
from pathlib import Path

import yaml

T = typing.TypeVar("T")


def load_recipe(cls: type[T], path: Path | None, overrides: list[str] | None = None) -> T:
    """Fill dataclass `cls` from a YAML file and `key=value` overrides; unknown keys are an error."""
    values = yaml.safe_load(Path(path).read_text()) if path else {}
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects key=value, got {item!r}")
        values[key.strip()] = yaml.safe_load(raw)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ValueError(f"unknown recipe keys for {cls.__name__}: {unknown}; known: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        if hints[key] is float and isinstance(value, int | str):
            values[key] = float(value)  # YAML reads 2e-4 as a string and 1 as an int
    return cls(**values)


def add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", type=Path, help="a YAML file in train/recipes/")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")


def save_recipe(recipe, path: Path) -> None:
    """Write the resolved recipe next to the run's outputs, so a run says exactly how it was made."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dataclasses.asdict(recipe), indent=2, default=str) + "\n")
