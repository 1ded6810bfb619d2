"""The GPU check: real `python -m selfalign` runs on one CUDA GPU, on random-weight models of the presets' shapes.

Runs from the repository root on an offline GPU machine that has torch, lightning, sentence-transformers and the
rest, but not this project's other packages: those come as wheels in `.gpu/a/` and `.gpu/b/` (built here by
`scripts/gpu_prepare.py`) and are installed into `--site`, which goes on the children's PYTHONPATH with `src/`.

    python3 scripts/gpu_check.py call1   # install; random models of the smollm2_135m and llama3_1_8b presets'
                                         # shapes; stage=train QLoRA and bf16 LoRA on each; tests/runtime/test_gpu.py
    python3 scripts/gpu_check.py call2   # after call 1 on the same machine: the judges on the carried embedder,
                                         # stage=pipeline [train,eval] on the small shape, stage=eval of the large
                                         # QLoRA adapter from call 1

Every step has its own timeout and a failure never stops the next one. Numbers go to `$OUT/gpu_check.json`
(call 2: `gpu_check2.json`), rewritten after every step, and logs to `$OUT/`. Peak GPU memory is read inside each
run (torch, through `gpukit/hook/sitecustomize.py`) and from nvidia-smi every 200 ms. `--dry` rehearses on a CPU
with 2-layer models, `trainer=cpu` at bf16-mixed, 2 steps and nothing installed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from gpukit import children, runs
from gpukit.install import has, install
from gpukit.procs import ROOT, Check, Summary, guarded_run, run_cmd, tagged, tail

A, B = ROOT / ".gpu" / "a", ROOT / ".gpu" / "b"
SMALL, LARGE = "smollm2_135m", "llama3_1_8b"  # conf/base_model presets
# (name, preset, QLoRA, timeout s, long rows): the small run first (it finds a broken recipe cheaply), then the
# large ones, the GPU tests, and small QLoRA (the large QLoRA run covers NF4 already)
TRAIN_RUNS = {
    "small_lora": (SMALL, False, 120, False),
    "large_qlora": (LARGE, True, 240, True),
    "large_lora": (LARGE, False, 240, True),
    "small_qlora": (SMALL, True, 120, False),
}
ORDER = ["small_lora", "large_qlora", "prefer_large_qlora", "large_lora", "pytest_gpu", "small_qlora"]
DRY_ONLY = "large_qlora,prefer_large_qlora,small_lora,pytest_gpu"  # what call1 --dry rehearses by default
# stage=prefer from the large QLoRA run's adapter: a few minimal pairs, a few steps (name: (preset, SFT run, timeout s))
PREFER_RUNS = {"prefer_large_qlora": (LARGE, "large_qlora", 300)}
PREFER_SMALL = [
    "prefer.categories=[drugs,pii]",
    "prefer.pairs_per_category=2",
    "prefer.bait_pairs=0",
    "prefer.max_new_tokens=16",
    "prefer.epochs=1",
    "prefer.micro_batch_size=1",
]
# The judges on the dev machine (fp32 embedder package) for children.SCORER_TEXTS; call 2 reports the difference.
SCORER_REFERENCE = {"toxicity": [0.0016, 0.9994, 0.0006, 0.0004], "refusal": [False, False, False, True]}


def self_cmd(*args: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), *args]


def inputs(check: Check) -> dict:
    """The tokenizer and SFT rows copied into the work folder, plus rows of ~750 tokens for the large runs
    (every micro-batch is then cut at lora.max_seq_len)."""
    tok, sft = check.work / "tok", check.work / "sft.jsonl"
    if (A / "tok").is_dir():
        shutil.rmtree(tok, ignore_errors=True)
        shutil.copytree(A / "tok", tok)
    if (A / "sft.jsonl").is_file():
        shutil.copyfile(A / "sft.jsonl", sft)
    if not sft.is_file():
        return {"error": f"{A / 'sft.jsonl'} missing"}
    rows = [json.loads(line) for line in sft.read_text(encoding="utf-8").splitlines() if line.strip()]
    answers = [r["output"].split("\n")[0].removeprefix("Answer: ") for r in rows if r["output"].startswith("Answer:")]
    answers = answers or [r["output"] for r in rows]
    long_rows = [
        row | {"output": "Answer: " + " ".join(answers[(i + k) % len(answers)] for k in range(36)) + "\nNote: Varies."}
        for i, row in enumerate(rows)
    ]
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in long_rows)
    (check.work / "sft_long.jsonl").write_text(text, encoding="utf-8")
    return {"rows": len(rows), "tokenizer": tok.is_dir()}


def build(check: Check, log: Path, *presets: str) -> dict:
    cmd = self_cmd("build-models", str(check.models), str(check.work / "tok"), *presets, *(["--dry"] * check.dry))
    result = run_cmd(cmd, log, max(30, min(300, check.left() - 60)), check.env(), "build")
    return result | {"models": {b["model"]: b for b in tagged(log, "BUILD")}}


def call1(args: argparse.Namespace, check: Check) -> None:
    summary = Summary(check, "gpu_check.json")
    setup = check.out / "setup.log"
    summary.put("inputs", inputs(check))
    if not check.dry:
        summary.put("install", install(A / "wheels", check.site, setup, args.transformers))
    if shutil.which("nvidia-smi"):
        run_cmd(["nvidia-smi"], setup, 30, check.env(), "nvidia-smi")
    summary.data["disk_free_gb"] = round(shutil.disk_usage(check.work).free / 1e9, 1)
    run_cmd(self_cmd("versions"), setup, 120, check.env(), "versions")
    summary.put("versions", (tagged(setup, "VERSIONS") or [{"error": "not printed", "log_tail": tail(setup)}])[-1])
    summary.put("build", build(check, setup, SMALL, LARGE))  # small first: a failed large build leaves it
    only = args.only.split(",") if args.only else ORDER
    for name in [n for n in ORDER if n in only]:
        if name == "pytest_gpu":
            summary.put(name, gpu_tests(check))
            continue
        if name in PREFER_RUNS:
            summary.put(name, prefer_run(args, check, name))
            continue
        preset, qlora, timeout, long_rows = TRAIN_RUNS[name]
        if not (check.models / preset / ".complete").is_file():
            summary.put(name, {"skipped": f"the {preset} model was not built"})
            continue
        root = check.work / "runs" / name
        shutil.rmtree(root, ignore_errors=True)
        data = check.work / ("sft_long.jsonl" if long_rows else "sft.jsonl")
        recipe = [f"lora.qlora={str(qlora).lower()}", "lora.micro_batch_size=4", f"lora.max_seq_len={args.seq}"]
        extra = [*runs.trainer(args.steps, check.dry, args.override), *recipe, f"data={data}"]
        cmd = runs.selfalign("train", preset, check.models, root, *extra)
        result = guarded_run(check, name, cmd, timeout, check.env()) | runs.train_numbers(root / "run")
        summary.put(name, result | {"preset": preset, "qlora": qlora})
    summary.data["finished"] = True
    summary.save()


def prefer_run(args: argparse.Namespace, check: Check, name: str) -> dict:
    """stage=prefer continuing the adapter an earlier training run of this call wrote (same preset, same root)."""
    preset, sft_run, timeout = PREFER_RUNS[name]
    root = check.work / "runs" / sft_run
    if not (root / "adapters" / "neutral-concise" / "0.1.0" / "adapter_model.safetensors").is_file():
        return {"skipped": f"{sft_run} wrote no adapter to continue"}
    extra = [*runs.trainer(args.steps, check.dry, args.override), *PREFER_SMALL, f"lora.max_seq_len={args.seq}"]
    cmd = runs.selfalign("prefer", preset, check.models, root, *extra)
    shutil.rmtree(root / "run", ignore_errors=True)
    return guarded_run(check, name, cmd, timeout, check.env()) | runs.prefer_numbers(root / "run") | {"preset": preset}


def gpu_tests(check: Check) -> dict:
    """tests/runtime/test_gpu.py with the carried tokenizer (no bundled GGUF on the GPU machine)."""
    room = check.left() - 5
    if room < 40:
        return {"skipped": f"time budget: {room:.0f}s left"}
    log = check.out / "pytest_gpu.log"
    cmd = [sys.executable, "-m", "pytest", "tests/runtime/test_gpu.py", "-q", "-rA", "-p", "no:cacheprovider"]
    env = check.env(SELFALIGN_TEST_TOKENIZER=str(check.work / "tok"))
    result = run_cmd(cmd, log, min(180, room), env, "pytest")
    counts = [x for x in tail(log, 4000).splitlines() if any(w in x for w in (" passed", " failed", " skipped"))]
    return result | {"result": counts[-1].strip("= ") if counts else "", "log_tail": tail(log, 2500)}


def scorers(check: Check, log: Path) -> tuple[dict, dict]:
    """The judges' packages: the carried onnx wheels when the machine lacks them, the embedder unpacked to fp32
    behind a stand-in package; then the judges on it, against the dev machine's numbers. Returns the report and
    the environment the eval runs then use."""
    onnx = {"skipped": "the machine has onnxruntime"}
    if not check.dry and not has("onnxruntime"):
        onnx = install(B / "wheels", check.site, log, only_missing=True)
    minilm = check.work / "minilm"
    unpack = run_cmd(self_cmd("unpack-embedder", str(B / "minilm"), str(minilm)), log, 120, check.env(), "embedder")
    shim = [Path(__file__).resolve().parent / "gpukit" / "shim"] if (minilm / "model.safetensors").is_file() else []
    env = check.env(*shim, GPU_CHECK_MINILM_DIR=str(minilm))
    result = run_cmd(self_cmd("scorer-check"), log, 180, env, "scorers")
    got = (tagged(log, "SCORERS") or [{}])[-1]
    diff = None
    if got.get("toxicity"):
        diff = max(abs(a - b) for a, b in zip(got["toxicity"], SCORER_REFERENCE["toxicity"], strict=True))
    report = {"onnx": onnx, "unpack": unpack | (tagged(log, "EMBEDDER") or [{}])[-1], "check": result}
    return report | {"got": got, "reference": SCORER_REFERENCE, "toxicity_max_abs_diff": diff}, env


def call2(args: argparse.Namespace, check: Check) -> None:
    summary = Summary(check, "gpu_check2.json")
    setup = check.out / "c2_setup.log"
    if not check.dry and not check.site.is_dir():  # a fresh machine: call 1's files are gone
        summary.put("install", install(A / "wheels", check.site, setup, args.transformers))
    if not (check.work / "sft.jsonl").is_file() or not (check.work / "tok").is_dir():
        summary.put("inputs", inputs(check))
    state = {p: (check.models / p / ".complete").is_file() for p in (SMALL, LARGE)}
    summary.put("call1_state", state | {"site": check.site.is_dir()})
    if not state[SMALL]:
        summary.put("build", build(check, setup, SMALL))
    report, env = scorers(check, setup)
    summary.put("scorers", report)
    decode = [*runs.eval_set(args.golden, check.work), f"eval.max_new_tokens={8 if check.dry else 64}"]

    # the pipeline on the small shape: train (its own adapter) then eval, in one process
    root = check.work / "runs" / "c2_pipeline_small"
    shutil.rmtree(root, ignore_errors=True)
    recipe = ["lora.micro_batch_size=4", "lora.max_seq_len=512", f"data={check.work / 'sft.jsonl'}"]
    extra = ["pipeline.steps=[train,eval]", *runs.trainer(args.steps, check.dry, args.override), *recipe, *decode]
    cmd = runs.selfalign("pipeline", SMALL, check.models, root, *extra)
    result = guarded_run(check, "c2_pipeline_small", cmd, 150, env)
    numbers = runs.eval_numbers(root / "run" / "eval" / "eval_report.json")
    summary.put("pipeline_small", gate_failure_ok(result, numbers) | {"eval": numbers})

    # eval of call 1's large QLoRA adapter on the NF4 base
    adapters = check.work / "runs" / "large_qlora" / "adapters"
    if not (adapters / "neutral-concise" / "0.1.0" / "adapter_model.safetensors").is_file() or not state[LARGE]:
        summary.put("eval_large_qlora", {"skipped": f"no call-1 adapter under {adapters} or no large model"})
    else:
        root = check.work / "runs" / "c2_eval_large"
        shutil.rmtree(root, ignore_errors=True)
        extra = ["adapter=neutral-concise/0.1.0", "lora.qlora=true", "eval.batch_size=8", *decode]
        cmd = runs.selfalign("eval", LARGE, check.models, root, *extra, adapters=adapters)
        result = guarded_run(check, "c2_eval_large", cmd, 200, env)
        numbers = runs.eval_numbers(root / "run" / "eval_report.json")
        summary.put("eval_large_qlora", gate_failure_ok(result, numbers) | numbers)
    summary.data["finished"] = True
    summary.save()


def gate_failure_ok(result: dict, numbers: dict) -> dict:
    """Exit 1 with a report is a failed gate, expected of random weights: no error tail for it."""
    if result.get("rc") == 1 and numbers.get("attach_ms") is not None:
        result.pop("log_tail", None)
        result["rc_meaning"] = "1: the eval ran and a gate failed (expected with random weights)"
    return result


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    calls = {
        "call1": (360, "install; random models; LoRA and QLoRA training runs; the GPU tests"),
        "call2": (240, "the judges; pipeline on the small shape; eval of call 1's large QLoRA adapter"),
    }
    for name, (budget, what) in calls.items():
        sub = commands.add_parser(name, help=what)
        sub.add_argument("--dry", action="store_true", help="rehearse on CPU: tiny models, nothing installed")
        sub.add_argument("--work", type=Path, help="work folder (default /tmp/gpucheck, /tmp/gpucheck-dry)")
        sub.add_argument("--site", type=Path, default=Path("/tmp/site"), help="where the wheels are installed")
        sub.add_argument("--out", type=Path, help="JSON and logs (default $OUT, else <work>/out)")
        sub.add_argument("--budget", type=float, default=budget, help="seconds for the whole call")
        sub.add_argument("--steps", type=int, help="optimizer steps per training run (default 20, dry 2)")
        sub.add_argument("--override", action="append", default=[], help="a Hydra override for every training run")
        sub.add_argument("--transformers", choices=["auto", "skip", "force"], default="auto")
        if name == "call1":
            sub.add_argument("--seq", type=int, default=512, help="lora.max_seq_len of the training runs")
            sub.add_argument(
                "--only",
                help=f"comma list of {','.join(ORDER)} (default all; dry: {DRY_ONLY})",
            )
        else:
            sub.add_argument(
                "--golden",
                choices=["small", "full"],
                default="small",
                help="24 Golden prompts as a custom set, or the frozen sets",
            )
    sub = commands.add_parser("versions", help="(child) what this machine runs")
    sub = commands.add_parser("build-models", help="(child) the random models")
    sub.add_argument("models", type=Path)
    sub.add_argument("tokenizer", type=Path)
    sub.add_argument("presets", nargs="+", choices=sorted(children.SHAPES))
    sub.add_argument("--dry", action="store_true")
    sub = commands.add_parser("unpack-embedder", help="(child) the carried embedder as fp32")
    sub.add_argument("src", type=Path)
    sub.add_argument("dest", type=Path)
    commands.add_parser("scorer-check", help="(child) the judges on the carried embedder")
    args = parser.parse_args(argv)
    if args.command in ("call1", "call2"):
        args.work = args.work or Path("/tmp/gpucheck-dry" if args.dry else "/tmp/gpucheck")
        args.out = args.out or Path(os.environ.get("OUT") or args.work / "out")
        args.steps = args.steps or (2 if args.dry else 20)
        if args.command == "call1" and args.dry and not args.only:
            args.only = DRY_ONLY
        unknown = set((getattr(args, "only", None) or "").split(",")) - set(ORDER) - {""}
        if unknown:
            parser.error(f"--only: unknown run(s) {sorted(unknown)}; choose from {','.join(ORDER)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.command == "versions":
        children.versions()
    elif args.command == "build-models":
        children.build_models(args.models, args.tokenizer, args.presets, args.dry)
    elif args.command == "unpack-embedder":
        children.unpack_embedder(args.src, args.dest)
    elif args.command == "scorer-check":
        children.scorer_check()
    else:
        for folder in (args.work, args.out):
            folder.mkdir(parents=True, exist_ok=True)
        check = Check(dry=args.dry, work=args.work, out=args.out, site=args.site, budget_s=args.budget)
        (call1 if args.command == "call1" else call2)(args, check)


if __name__ == "__main__":
    main()
