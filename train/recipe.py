"""Recipes: training hyper-parameters live in small YAML files, read into typed dataclasses.

Every script takes `--recipe FILE` and any number of `--set key=value` overrides (values parsed as YAML, so
`--set max_steps=20 --set lr=1e-4` work), so a toy run and a full run differ only on the command line. A recipe is
checked whole before anything loads: unknown keys, missing required keys and values of the wrong type are errors
that name the key, and a script's input folders (`check_inputs`) must exist.
"""

import argparse
import dataclasses
import json
import types
import typing
from pathlib import Path

import yaml

T = typing.TypeVar("T")

# Recipe keys that name something a run reads: checked to exist before a run starts (see check_inputs).
INPUT_KEYS = ("init", "base", "data")


class RecipeError(ValueError):
    """A recipe that cannot run; the message names the key and what it expected."""


def load_recipe(cls: type[T], path: Path | None, overrides: list[str] | None = None, check_paths: bool = False) -> T:
    """Fill dataclass `cls` from a YAML file and `key=value` overrides, every value checked against its type.

    With `check_paths`, the input keys (INPUT_KEYS) must name existing paths: what the scripts' command lines ask
    for, so that a wrong `--set data=...` is reported before a model or a dataset loads.
    """
    values = _read_file(Path(path)) if path else {}
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise RecipeError(f"--set expects key=value, got {item!r}")
        values[key.strip()] = yaml.safe_load(raw)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise RecipeError(f"unknown recipe keys for {cls.__name__}: {unknown}; known: {sorted(fields)}")
    required = [
        name
        for name, f in fields.items()
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and name not in values
    ]
    if required:
        raise RecipeError(f"{cls.__name__} needs the recipe key(s) {required} (in the file or as --set KEY=VALUE)")
    hints = typing.get_type_hints(cls)
    values = {key: _coerce(key, value, hints[key]) for key, value in values.items()}
    recipe = cls(**values)
    if check_paths:
        check_inputs(recipe)
    return recipe


def check_inputs(recipe) -> None:
    """Every input key that is set must name an existing file or folder; all missing ones are named at once."""
    missing = [
        f"{key}={getattr(recipe, key)}"
        for key in INPUT_KEYS
        if hasattr(recipe, key) and getattr(recipe, key) is not None and not Path(getattr(recipe, key)).exists()
    ]
    if missing:
        raise RecipeError(f"{type(recipe).__name__}: no such file or folder for {', '.join(missing)}")


def _read_file(path: Path) -> dict:
    if not path.is_file():
        raise RecipeError(f"recipe file {path} does not exist")
    values = yaml.safe_load(path.read_text())
    if values is None:
        raise RecipeError(f"recipe file {path} is empty: write one `key: value` per line (see train/recipes/)")
    if not isinstance(values, dict):
        raise RecipeError(f"recipe file {path} must be a mapping of `key: value` lines, not a {type(values).__name__}")
    return values


def _coerce(key: str, value, hint):
    """`value` as type `hint`, or a RecipeError naming the key. YAML reads 2e-4 as a string and 1 as an int."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(key, value, option)
            except RecipeError as err:
                errors.append(str(err))
        raise RecipeError(errors[0] if len(errors) == 1 else f"recipe key {key}: {value!r} fits none of {hint}")
    if origin is typing.Literal:
        if value in args:
            return value
        raise RecipeError(f"recipe key {key} must be one of {list(args)}, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise RecipeError(f"recipe key {key} must be a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, args[0] if args else typing.Any) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"recipe key {key} must be a mapping, got {value!r}")
        key_type, value_type = args or (typing.Any, typing.Any)
        return {_coerce(key, k, key_type): _coerce(f"{key}.{k}", v, value_type) for k, v in value.items()}
    if hint is typing.Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str or hint is Path:
        if isinstance(value, str):
            return hint(value)
    elif isinstance(hint, type) and isinstance(value, hint):
        return value
    name = getattr(hint, "__name__", str(hint))
    raise RecipeError(f"recipe key {key} must be {name}, got {value!r} ({type(value).__name__})")


def add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", type=Path, help="a YAML file in train/recipes/")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")


def recipe_from_command_line(cls: type[T], description: str | None, argv: list[str] | None = None) -> T:
    """A training script's whole command line: `--recipe FILE` and `--set KEY=VALUE`, read into `cls` and checked,
    input paths included, before anything loads."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_recipe_arguments(parser)
    args = parser.parse_args(argv)
    return load_recipe(cls, args.recipe, args.overrides, check_paths=True)


def save_recipe(recipe, path: Path) -> None:
    """Write the resolved recipe next to the run's outputs, so a run says exactly how it was made."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dataclasses.asdict(recipe), indent=2, default=str) + "\n")
