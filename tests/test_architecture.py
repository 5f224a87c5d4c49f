"""The tree reads one way: imports follow the pipeline, corpus -> tokenizer -> the shipped model code -> train ->
evaluation -> hub, and the Space stands alone (it ships by itself). Checked on every import statement, including
the ones inside functions."""

import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# stage of every top-level package or module of the project; a module may import its own stage or an earlier one
STAGES = {
    "corpus": 0,
    "tokenizer": 1,
    "configuration_medeir": 2,  # the code that ships inside every model folder (train.export SHIPPED_CODE)
    "modeling_medeir": 2,
    "onnx_encoder": 2,
    "request_checks": 2,  # the request rules that the Endpoint handler and the Space both ship (hub.publish)
    "train": 3,
    "evaluation": 4,
    "hub": 5,
}
STANDALONE = {"space"}  # ships by itself: imports no project module but the files shipped with it
SHIPPED_WITH = {"space": {"request_checks"}}
PUBLISHES = {"hub": {"space"}}  # hub.publish assembles the Space from its files
TOOLING = {"scripts", "tests"}  # may import any stage


def project_imports(path: Path) -> list[tuple[int, str]]:
    """(line, top-level name) of every absolute import in `path` that names a project module."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [(node.lineno, name.split(".")[0]) for name in names if name.split(".")[0] in STAGES | {"space": 0}]
    return found


def owner(path: Path) -> str:
    relative = path.relative_to(REPO)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def project_files() -> list[Path]:
    files = [p for p in REPO.glob("*.py")]
    for top in [*STAGES, *STANDALONE]:
        if (REPO / top).is_dir():
            files += sorted((REPO / top).rglob("*.py"))
    return files


def violations(path: Path) -> list[str]:
    me = owner(path)
    out = []
    for line, name in project_imports(path):
        if name == me or me in TOOLING:
            continue
        if me in STANDALONE and name in SHIPPED_WITH.get(me, ()):
            continue
        if me in STANDALONE:
            out.append(f"{path.relative_to(REPO)}:{line} imports {name}, but {me}/ stands alone")
        elif name in PUBLISHES.get(me, ()):
            continue
        elif name in STANDALONE or STAGES[name] > STAGES[me]:
            out.append(f"{path.relative_to(REPO)}:{line} ({me}) imports the later stage {name}")
    return out


def test_no_module_imports_a_later_stage():
    assert len(project_files()) > 40
    found = [v for path in project_files() for v in violations(path)]
    assert not found, "\n".join(found)


@pytest.mark.parametrize(
    ("where", "source", "expected"),
    [
        ("train/x.py", "def f():\n    from hub.publish import main\n", "(train) imports the later stage hub"),
        ("corpus/x.py", "import evaluation.metrics\n", "(corpus) imports the later stage evaluation"),
        ("space/x.py", "from modeling_medeir import MedEIRModel\n", "but space/ stands alone"),
        ("request_checks.py", "from space.engine import Engine\n", "(request_checks) imports the later stage space"),
        ("modeling_medeir.py", "from train import recipe\n", "(modeling_medeir) imports the later stage train"),
    ],
)
def test_the_check_sees_a_backward_import(where, source, expected, tmp_path, monkeypatch):
    monkeypatch.setattr(f"{__name__}.REPO", tmp_path)
    path = tmp_path / where
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(source)
    assert any(expected in v for v in violations(path)), violations(path)


def test_the_shipped_code_imports_only_torch_and_transformers_at_top_level():
    """The remote-code files run on the Hub from the model folder alone; onnx_encoder.py needs no torch (onnxruntime
    and tokenizers are imported where it runs a session)."""
    third_party = {
        "configuration_medeir.py": {"transformers"},
        "modeling_medeir.py": {"torch", "transformers", "configuration_medeir"},
        "onnx_encoder.py": {"numpy"},
        "request_checks.py": set(),  # beside handler.py and app.py: the standard library only
    }
    for name, allowed in third_party.items():
        top = set()
        for node in ast.parse((REPO / name).read_text()).body:
            if isinstance(node, ast.Import):
                top |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                top.add("configuration_medeir" if node.level else (node.module or "").split(".")[0])
        extra = top - allowed - set(sys.stdlib_module_names)
        assert not extra, f"{name} imports {sorted(extra)} at top level"
