"""Seconds and peak memory of the Endpoint handler at its limits, served as an Endpoint serves it: run on an idle machine.

    python -m hub.publish model --model models/medeir-small --out build/hub-model   # the model repository
    python -m evaluation.endpoint_load build/hub-model

The folder is a model repository as `hub.publish model` assembles it: its `handler.py` (with `request_checks.py`
beside it) is loaded from the folder the way Inference Endpoints loads it. Three requests, each in a fresh process so
that its peak resident memory is its own: one far over the character limit (refused before tokenizing), the most
padded tokens the limits accept in one request, and the longest texts the limits accept. The limits are read from
the environment as the Endpoint reads them.
"""

import argparse
import importlib.util
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

CASES = ("refuse-oversized", "worst-accepted", "longest-accepted")
WORD = "word "  # one token in bert-base-uncased and MedEIR vocabularies: requests of exact token counts


def handler_file(folder: str) -> Path:
    """The folder's handler.py, or SystemExit saying how to assemble a folder that has one."""
    path = Path(folder) / "handler.py"
    if not path.is_file():
        raise SystemExit(
            f"{path} does not exist: assemble the model repository first "
            f"(python -m hub.publish model --model MODEL --out {folder})"
        )
    return path


def load_handler_module(folder: str) -> ModuleType:
    """The folder's handler.py, imported as the Endpoints toolkit imports it: the folder first on the path (for
    request_checks.py beside it), the file loaded by its path."""
    path = handler_file(folder)
    sys.path.insert(0, str(Path(folder).resolve()))
    spec = importlib.util.spec_from_file_location("handler", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def request_for(handler, case: str) -> dict[str, Any]:
    """The request of one case, sized from the handler's limits."""
    if case == "refuse-oversized":
        return {"inputs": "x" * 30_000_000}
    if case == "worst-accepted":  # the most padded tokens the limits allow in one request
        per_text = min(handler.max_tokens, handler.max_total_tokens // handler.max_batch)
        count = min(handler.max_batch, handler.max_total_tokens // per_text)
    elif case == "longest-accepted":  # the longest texts, as many as the limits allow
        per_text = min(handler.max_tokens, handler.max_total_tokens)
        count = min(handler.max_batch, handler.max_total_tokens // per_text)
    else:
        raise ValueError(f"unknown case {case!r}; one of {', '.join(CASES)}")
    return {"inputs": [WORD * (per_text - 2)] * count, "parameters": {"batch_size": 256}}


def measure_case(folder: str, case: str) -> dict[str, Any]:
    """Seconds and peak resident memory of one request at the limits (one case per fresh process)."""
    served = load_handler_module(folder)
    handler = served.EndpointHandler(folder)
    before = peak_rss_bytes()
    request = request_for(handler, case)
    start = time.perf_counter()
    try:
        result = handler(request)
        outcome = f"{len(result['embeddings'])} embeddings, {sum(result['tokens']):,} tokens"
    except ValueError as err:
        outcome = f"refused: {str(err)[:120]}"
    return {
        "case": case,
        "seconds": round(time.perf_counter() - start, 3),
        "peak_rss_gb": round(peak_rss_bytes() / 1e9, 3),
        "rss_before_gb": round(before / 1e9, 3),
        "outcome": outcome,
        "limits": served.read_limits(served.LIMITS),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="a model repository folder with handler.py, e.g. build/hub-model")
    parser.add_argument("--case", choices=CASES, default=None, help=argparse.SUPPRESS)  # one case, in this process
    args = parser.parse_args(argv)
    handler_file(args.folder)
    if args.case:
        print(json.dumps(measure_case(args.folder, args.case)))
        return
    for case in CASES:
        command = [sys.executable, "-m", "evaluation.endpoint_load", args.folder, "--case", case]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        print(result.stdout.strip().splitlines()[-1] if result.returncode == 0 else f"{case}: {result.stderr[-500:]}")


if __name__ == "__main__":
    main()
