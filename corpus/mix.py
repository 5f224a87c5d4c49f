"""The training mix: which share of each source's pair groups `corpus.build` writes to pairs/train.parquet.

Training samples the file as written, so the proportions live here and nowhere else. A share keeps that fraction of a
source's groups (sha256 of the group, independent of the split's hash), so whole groups stay or go and a build is the
same on every machine. Sources not named are kept whole. Each mix was judged with the data yardstick
(`python -m train.yardstick`, results/yardstick/).
"""

import hashlib

MIXES: dict[str, dict[str, float]] = {
    # every source in full, no disease profiles: the build before the mix existed
    "today": {"hpoa": 0.0},
    # medical first: the dictionaries and GO down-weighted, no disease profiles
    "medical": {"wordnet": 0.2, "gcide": 0.2, "go": 0.3, "hpoa": 0.0},
    # medical first, with symptoms-in-everyday-words -> disease profiles
    "medical-profiles": {"wordnet": 0.2, "gcide": 0.2, "go": 0.3},
    # the same, with every definition pair also written definition -> name (REVERSED), the form of a prose search
    "medical-profiles-reversed": {"wordnet": 0.2, "gcide": 0.2, "go": 0.3},
}
# definition kinds a mix also writes the other way round (corpus.pairs.reversed_definitions); none unless named
REVERSED: dict[str, tuple[str, ...]] = {
    "medical-profiles-reversed": (
        "hpo_term_definition",
        "go_name_definition",
        "wordnet_lemma_gloss",
        "gcide_headword_definition",
    ),
}
DEFAULT_MIX = "medical-profiles"


def keeps(shares: dict[str, float], source: str, group: str) -> bool:
    """Whether a training pair of this source and group is in the mix."""
    share = shares.get(source, 1.0)
    if share >= 1.0:
        return True
    digest = hashlib.sha256(f"mix:{group}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < share
