"""Group-wise train / validation / test split and the holdout check.

A group (ICD-10-CM 3-character category, HPO term, GO term, synset, ...) is hashed with sha256, so the split is the
same on every machine and Python version, and near-duplicates inside one group never straddle two splits.
"""

import hashlib
from collections.abc import Iterable

TEST_SHARE = 0.20
VALIDATION_SHARE = 0.05


def split_of(group: str) -> str:
    """Test for ~20% of groups, validation for ~5%, train for the rest."""
    digest = hashlib.sha256(group.encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < TEST_SHARE:
        return "test"
    if u < TEST_SHARE + VALIDATION_SHARE:
        return "validation"
    return "train"


def leaked(values: Iterable[str], held_out: set[str]) -> list[str]:
    """The values (already normalised) that equal a held-out query string."""
    return [v for v in values if v in held_out]
