"""The prepared GPU check (scripts/gpu_check.py, gpu_bench.py, gpu_prepare.py) on a CPU: its parsers, FLOP count,
model return, flash-attn patch and source list, and (slow) the whole --cpu rehearsal, so a lease finds no typo."""

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from scripts import gpu_bench, gpu_check, gpu_prepare

from .conftest import REPO, tiny_config


def test_recipe_stages_are_read_from_the_recipe_script():
    stages = gpu_check.recipe_stages(REPO / "train" / "medeir-small.sh")
    modules = [s[0] for s in stages]
    assert "train.finetune" in modules and modules[-1] == "train.export", stages
    recipes = [gpu_check.option(s, "--recipe") for s in stages if s[0] == "train.finetune"]
    assert recipes and all((REPO / r).exists() for r in recipes), recipes


def test_recipe_stages_handle_variables_continuations_and_stop_at_the_export(tmp_path):
    script = tmp_path / "r.sh"
    script.write_text(
        "PY=${PYTHON:-python}\n[ -f x ] || $PY -m corpus.build  # comment\n"
        "python -m train.finetune --recipe a.yaml \\\n  --set lr=1\n"
        "${PY} -m train.export in out\n$PY -m train.finetune --recipe loso.yaml\n"
    )
    stages = gpu_check.recipe_stages(script)
    assert stages == [
        ["corpus.build"],
        ["train.finetune", "--recipe", "a.yaml", "--set", "lr=1"],
        ["train.export", "in", "out"],
    ]


def test_junit_summary_counts_and_names_failures(tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text(
        '<testsuites><testsuite><testcase classname="tests.t" name="a"/>'
        '<testcase classname="tests.t" name="b"><failure message="boom"/></testcase>'
        '<testcase classname="tests.t" name="c"><skipped message="needs CUDA"/></testcase></testsuite></testsuites>'
    )
    summary = gpu_check.junit_summary(xml)
    assert (summary["passed"], summary["failed"], summary["skipped"]) == (1, 1, 1)
    assert summary["failures"] == [{"test": "t::b", "message": "boom"}]


def test_step_flops_counts_each_term():
    config = tiny_config(
        hidden_size=8, num_attention_heads=2, num_hidden_layers=2, intermediate_size=16, vocab_size=100
    )
    flops = gpu_bench.step_flops(config, tokens=10, masked_tokens=3, seq_len=5)
    n_encoder = 2 * (4 * 8 * 8 + 2 * 8 * 16)
    n_head = 8 * 8 + 100 * 8
    assert flops["n_encoder"] == n_encoder and flops["n_head_decoder"] == n_head
    assert flops["flops"] == 6 * n_encoder * 10 + 6 * n_head * 3 + 12 * 2 * 8 * 5 * 10
    glu_config = tiny_config(
        hidden_size=8, num_attention_heads=2, num_hidden_layers=1, intermediate_size=16, feed_forward_type="glu"
    )
    glu = gpu_bench.step_flops(glu_config, 1, 0, 1)
    assert glu["n_encoder"] == 4 * 8 * 8 + 2 * 16 * 8 + 16 * 8


def test_the_model_comes_back_in_parts_that_reassemble(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "CHUNK_BYTES", 4096)
    exported = tmp_path / "export"
    (exported / "1_Pooling").mkdir(parents=True)
    weights = bytes(range(256)) * 64  # 16 KiB that gzip cannot shrink much below a few parts
    (exported / "model.safetensors").write_bytes(os.urandom(12000) + weights)
    (exported / "1_Pooling" / "config.json").write_text("{}")
    shipped = REPO / "models" / "medeir-small" / "modules.json"
    (exported / "modules.json").write_bytes(shipped.read_bytes())  # identical to the shipped file: not returned
    out = tmp_path / "out"
    out.mkdir()
    check = gpu_check.Check(args=None, sizes=None, out=out, work=tmp_path, deadline=0)
    record = gpu_check.return_model(check, exported)
    assert record["status"] == "ok" and record["same_as_shipped"] == ["modules.json"]
    parts = sorted(out.glob("model.tar.part-*"))
    assert len(parts) == record["parts"] > 1 and all(p.stat().st_size <= 4096 for p in parts)
    restored = tmp_path / "restored"
    with tarfile.open(fileobj=io.BytesIO(b"".join(p.read_bytes() for p in parts))) as t:
        gpu_prepare.extract(t, restored)
    assert (restored / "model.safetensors").read_bytes() == (exported / "model.safetensors").read_bytes()
    assert (restored / "1_Pooling" / "config.json").exists() and not (restored / "modules.json").exists()
    assert "cp models/medeir-small/modules.json" in record["reassemble"]


def flash_sdist() -> Path:
    found = sorted((REPO / "build" / "gpu-prepare").glob(f"flash_attn-{gpu_prepare.FLASH_VERSION}.tar.gz"))
    if not found:
        pytest.skip("the flash-attn sdist is not downloaded (scripts/gpu_prepare.sh does it)")
    return found[0]


def test_flash_attn_patch_applies_and_its_source_list_is_complete(tmp_path):
    root = gpu_prepare.patched_tree(flash_sdist(), tmp_path)
    sources = gpu_prepare.source_list(root)
    assert len(sources) == gpu_check.FLASH_OBJECTS and sources[0] == "csrc/flash_attn/flash_api.cpp"
    assert all((root / s).is_file() for s in sources)
    assert not any("causal" in s or "hdim96" in s or "hdim128" in s for s in sources)
    # every kernel flash_api.cpp dispatches to (fp16/bf16 x head dim 32/64, non-causal) is defined in the list
    kernels = "".join((root / s).read_text() for s in sources[1:])
    for dtype in ("cutlass::half_t", "cutlass::bfloat16_t"):
        for dim in (32, 64):
            for name in ("run_mha_fwd_", "run_mha_bwd_", "run_mha_fwd_splitkv_dispatch"):
                assert f"{name}<{dtype}, {dim}, false>" in kernels, (name, dtype, dim)
    assert "FLASHATTENTION_HEADDIMS_32_64" in (root / "csrc/flash_attn/src/static_switch.h").read_text()
    api = (root / "csrc/flash_attn/flash_api.cpp").read_text()
    assert "BOOL_SWITCH(params.is_causal" not in api and api.count("CAUSAL_SWITCH(params.is_causal") == 2
    _, missing = gpu_prepare.include_closure(root, sources)
    assert not [n for n in missing if n.startswith(("cute/", "cutlass/"))], missing
    assert gpu_check.flash_sources_ok(root) == []  # the check reads the same list (gpu_prepare.source_list)


def test_the_trimmed_flash_attn_archive_builds_from_its_own_files(tmp_path):
    root = gpu_prepare.patched_tree(flash_sdist(), tmp_path / "src")
    record = gpu_prepare.flash_archive(root, tmp_path / "f.tar.xz")
    assert record["bytes"] < 1_000_000  # it must fit next to the 59 MB model in the 64 MiB upload
    with tarfile.open(tmp_path / "f.tar.xz") as t:
        gpu_prepare.extract(t, tmp_path / "x")
    unpacked = tmp_path / "x" / root.name
    files, _ = gpu_prepare.include_closure(unpacked, gpu_prepare.source_list(unpacked))
    assert len(files) + len(gpu_prepare.FLASH_PYTHON) == record["files"]


def test_data_subset_fits_the_room_and_keeps_every_kind(icd_hpo_data, tmp_path):
    recipe = REPO / "train" / "recipes" / "finetune-small.yaml"
    full = gpu_prepare.data_subset(icd_hpo_data, tmp_path / "all", 10**9, recipe)
    train_bytes = (tmp_path / "all" / "pairs" / "train.parquet").stat().st_size
    room = train_bytes // 3
    small = gpu_prepare.data_subset(icd_hpo_data, tmp_path / "small", room, recipe)
    assert small["status"] == "ok" and small["bytes"] <= room and 0 < small["rows"] < full["rows"]
    written = pq.read_table(tmp_path / "small" / "pairs" / "train.parquet").column("kind").to_pylist()
    assert small["kinds"] == full["kinds"] == sorted(set(written))
    build = pq.read_table(icd_hpo_data / "pairs" / "train.parquet").column("kind").to_pylist()
    for kind in set(build):  # the build's proportions, not re-weighted (one row of each kind at least)
        assert abs(written.count(kind) / len(written) - build.count(kind) / len(build)) < 0.01 + 1 / len(written)


@pytest.mark.slow
def test_cpu_rehearsal_runs_every_step_and_writes_the_report(icd_hpo_data, tmp_path):
    """The same script as on the GPU, --cpu at tiny sizes: minutes on the shared 2-core CPU, seconds of each step."""
    data = tmp_path / "data"
    gpu_prepare.data_subset(icd_hpo_data, data, 200_000, REPO / "train" / "recipes" / "finetune-small.yaml")
    out = tmp_path / "out"
    env = {**os.environ, "MEDEIR_GPU_WORK": str(tmp_path / "work")}
    command = [sys.executable, "-m", "scripts.gpu_check", "--cpu", "--out", str(out), "--data", str(data)]
    subprocess.run([*command, "--budget-s", "900"], cwd=REPO, env=env, check=True, timeout=1200)
    report = json.loads((out / "report.json").read_text())
    for step in ("environment", "a_tests", "c_mfu", "d_recipe"):
        assert report[step]["status"] == "ok", (step, report[step])
    assert report["b_speed"]["status"] == "ok", report["b_speed"]["status"]
    speed_runs = [r for part in ("forward", "train") for r in report["b_speed"][part].values()]
    assert len(speed_runs) == 2 and all(r["status"] == "ok" and r.get("rows") for r in speed_runs), speed_runs
    assert report["e_flash"]["status"].startswith(("skipped: dry run", "skipped: no"))
    assert report["a_tests"]["passed"] > 0 and report["a_tests"]["failed"] == 0
    stages = {s["module"]: s["status"] for s in report["d_recipe"]["stages"]}
    assert stages["train.export"] == "ok" and report["d_recipe"]["model"]["status"] == "ok"
    returned = sorted(p.name for p in out.iterdir())
    assert {"report.json", "report.md", "logs.tar.xz"} <= set(returned) and len(returned) <= gpu_check.RETURN_FILES
    assert all(p.stat().st_size <= gpu_check.RETURN_FILE_BYTES for p in out.iterdir())
    assert "cpu rehearsal" in (out / "report.md").read_text()


@pytest.mark.parametrize("has_filter", [True, False])
def test_archives_unpack_on_every_python_the_project_admits(tmp_path, monkeypatch, has_filter):
    """tarfile's "data" filter exists from Python 3.11.4 on; before it the same rule is checked by hand."""
    if not has_filter:
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
    good, bad = tmp_path / "good.tar", tmp_path / "bad.tar"
    (tmp_path / "a.txt").write_text("kept")
    with tarfile.open(good, "w") as t:
        t.add(tmp_path / "a.txt", arcname="folder/a.txt")
    with tarfile.open(good) as t:
        gpu_prepare.extract(t, tmp_path / "out")
    assert (tmp_path / "out" / "folder" / "a.txt").read_text() == "kept"
    with tarfile.open(bad, "w") as t:
        t.add(tmp_path / "a.txt", arcname="../escaped.txt")
    with tarfile.open(bad) as t, pytest.raises(tarfile.TarError):
        gpu_prepare.extract(t, tmp_path / "out2")
    assert not (tmp_path / "escaped.txt").exists()
