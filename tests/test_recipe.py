"""train.recipe: a recipe is checked whole, before any model or data loads, and every error names its key."""

import subprocess
import sys

import pytest

from scripts import gpu_check
from train.colbert import ColbertRecipe
from train.finetune import FinetuneRecipe
from train.lora import LoraRecipe
from train.pretrain import PretrainRecipe
from train.recipe import RecipeError, load_recipe

from .conftest import REPO


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["batch_size=abc"], r"recipe key batch_size must be int, got 'abc' \(str\)"),
        (["batch_size=2.5"], "recipe key batch_size must be int, got 2.5"),
        (["batch_size=true"], "recipe key batch_size must be int, got True"),
        (["seq_len=abc"], "recipe key seq_len must be int"),
        (["lr=fast"], "recipe key lr must be float, got 'fast'"),
        (["whole_word_mask=maybe"], "recipe key whole_word_mask must be bool, got 'maybe'"),
        (["eval_length_factors=[1, x]"], r"recipe key eval_length_factors\[1\] must be int, got 'x'"),
        (["eval_length_factors=4"], "recipe key eval_length_factors must be a list, got 4"),
        (["max_train_texts=many"], "recipe key max_train_texts must be int, got 'many'"),
        (["max_stepz=3"], r"unknown recipe keys for PretrainRecipe: \['max_stepz'\]"),
        (["=3"], "--set expects key=value"),
    ],
)
def test_a_bad_value_names_its_key(overrides, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(PretrainRecipe, None, ["init=x", *overrides])


def test_values_are_converted_to_their_types():
    recipe = load_recipe(PretrainRecipe, None, ["init=x", "lr=2e-4", "max_grad_norm=1", "max_train_texts=null"])
    assert recipe.lr == 2e-4 and isinstance(recipe.max_grad_norm, float) and recipe.max_train_texts is None
    finetune = load_recipe(FinetuneRecipe, None, ["init=x", "max_seq_length=256", "pair_kinds=[a, b]", "pair_rows=9"])
    assert finetune.max_seq_length == 256 and finetune.pair_kinds == ["a", "b"] and finetune.pair_rows == 9
    with pytest.raises(RecipeError, match=r"recipe key max_seq_length must be int, got 'abc'"):
        load_recipe(FinetuneRecipe, None, ["init=x", "max_seq_length=abc"])
    with pytest.raises(RecipeError, match=r"recipe key pair_rows must be int"):
        load_recipe(FinetuneRecipe, None, ["init=x", "pair_rows=lots"])


@pytest.mark.parametrize(
    ("content", "message"), [("", "is empty"), ("# nothing\n", "is empty"), ("- a\n", "not a list")]
)
def test_an_empty_or_malformed_recipe_file_is_a_clear_error(tmp_path, content, message):
    path = tmp_path / "recipe.yaml"
    path.write_text(content)
    with pytest.raises(RecipeError, match=f"recipe file {path} .*{message}"):
        load_recipe(PretrainRecipe, path)
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(PretrainRecipe, tmp_path / "missing.yaml")


def test_a_missing_required_key_is_named():
    with pytest.raises(RecipeError, match=r"LoraRecipe needs the recipe key\(s\) \['base'\]"):
        load_recipe(LoraRecipe, None, ["r=4"])


def test_missing_input_folders_are_all_named_when_the_paths_are_checked(tmp_path):
    (tmp_path / "init").mkdir()
    overrides = [f"init={tmp_path / 'init'}", "data=/nonexistent"]
    assert load_recipe(PretrainRecipe, None, overrides).data == "/nonexistent"  # parsing alone reads no files
    with pytest.raises(RecipeError, match=r"PretrainRecipe: no such file or folder for data=/nonexistent$"):
        load_recipe(PretrainRecipe, None, overrides, check_paths=True)
    with pytest.raises(RecipeError, match=r"for init=/no/init, data=/nonexistent"):
        load_recipe(PretrainRecipe, None, ["init=/no/init", "data=/nonexistent"], check_paths=True)


@pytest.mark.parametrize("module", ["train.pretrain", "train.finetune", "train.lora"])
def test_a_script_refuses_a_bad_recipe_before_loading_anything(module, tmp_path):
    key = "base" if module == "train.lora" else "init"
    command = [sys.executable, "-m", module, "--set", f"{key}={tmp_path}", "--set", f"output_dir={tmp_path / 'out'}"]
    result = subprocess.run([*command, "--set", "batch_size=abc"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode != 0 and "recipe key batch_size must be int, got 'abc'" in result.stderr
    result = subprocess.run([*command, "--set", "data=/nonexistent"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode != 0 and "no such file or folder for data=/nonexistent" in result.stderr
    assert not (tmp_path / "out").exists()  # nothing written: no recipe.json, no checkpoint


RECIPE_CLASSES = {
    "train.pretrain": PretrainRecipe,
    "train.finetune": FinetuneRecipe,
    "train.colbert": ColbertRecipe,
    "train.lora": LoraRecipe,
}


@pytest.mark.parametrize("script", sorted((REPO / "train").glob("*.sh")), ids=lambda path: path.name)
def test_pipeline_scripts_name_existing_recipes_with_known_keys(script):
    """Every training stage of a pipeline script reads a recipe file that exists, and every `--set` names a key of
    that stage's recipe with a value of the right type: a typo fails here, not an hour into a run."""
    stages = [s for s in gpu_check.recipe_stages(script, through_first_export=False) if s[0] in RECIPE_CLASSES]
    assert stages, f"{script.name} runs no recipe"
    for stage in stages:
        recipe = REPO / gpu_check.option(stage, "--recipe")
        overrides = [stage[i + 1] for i, arg in enumerate(stage[:-1]) if arg == "--set"]
        assert recipe.exists(), (script.name, stage)
        load_recipe(RECIPE_CLASSES[stage[0]], recipe, overrides)
