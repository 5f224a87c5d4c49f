"""The handler's load measurement: requests sized from the limits, run on the handler a model repository ships."""

import json
import subprocess
import sys

import pytest

from evaluation.endpoint_load import CASES, request_for
from hub.publish import assemble_model

from .conftest import REPO


class Limits:
    max_tokens, max_batch, max_total_tokens = 8192, 64, 131_072


def test_requests_are_sized_from_the_limits():
    worst = request_for(Limits, "worst-accepted")
    assert len(worst["inputs"]) == 64 and worst["inputs"][0].count("word") == 2048 - 2
    longest = request_for(Limits, "longest-accepted")
    assert len(longest["inputs"]) == 16 and longest["inputs"][0].count("word") == 8192 - 2
    assert len(request_for(Limits, "refuse-oversized")["inputs"]) == 30_000_000
    with pytest.raises(ValueError, match="unknown case"):
        request_for(Limits, "nope")


def test_one_case_runs_on_the_assembled_repositorys_own_handler(tiny_model_dir, tmp_path):
    card = tmp_path / "card.md"
    card.write_text("# MedEIR tiny (test)\n")
    folder = tmp_path / "hub-model"
    assemble_model(tiny_model_dir, folder, card)
    command = [sys.executable, "-m", "evaluation.endpoint_load", str(folder), "--case", CASES[0]]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert measured["case"] == "refuse-oversized" and measured["outcome"].startswith("refused: inputs[0] is 30,000,000")
    assert measured["limits"]["MEDEIR_MAX_CHARS"] == 100_000 and measured["peak_rss_gb"] > 0
    missing = subprocess.run(
        [sys.executable, "-m", "evaluation.endpoint_load", str(tiny_model_dir)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert missing.returncode != 0 and "assemble the model repository first" in missing.stderr
