"""Rebuild the vendored judge data in judge_data/ from local clones of the public source repositories.

    python scripts/vendor_judge_data.py refusal  --refusal-direction DIR --jailbreakbench-artifacts DIR --coconot DIR \
        --hh-rlhf DIR
    python scripts/vendor_judge_data.py toxicity --davidson DIR --toxigen DIR
    python scripts/vendor_judge_data.py smollm2  --adapter adapters/neutral-concise/0.1.0 [--check]

Nothing here runs at install or test time: the outputs are committed (see judge_data/README.md for the
sources, their licences and the sha256 of every file read). Each source is read at the pinned commit with
`git show`, so a clone on another branch gives the same bytes; the script refuses a clone that lacks it.

`refusal` samples model responses deterministically (seeded) and writes judge_data/refusal/responses.jsonl
without labels; the labels live in judge_data/refusal/labels.jsonl, written by hand against RUBRIC.md, and
`refusal --check` verifies that every labelled id still maps to the same response text.
`toxicity` copies Davidson et al.'s CSV as it is and extracts ToxiGen's unique human-curated statements.
`smollm2` decodes the bundled SmolLM2-135M-Instruct (greedy, 128 new tokens) and a neutral-concise SFT adapter on
pair-grammar prompts planned with seed 7 (disjoint from the Golden 100 and the policy set), and writes
judge_data/refusal/smollm2_responses.jsonl keeping the hand-written `label` of each id already there.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import random
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "judge_data"

REFUSAL_DIRECTION = ("andyrdt/refusal_direction", "9d852fae1a9121c78b29142de733cb1340770cc3")
JBB_ARTIFACTS = ("JailbreakBench/artifacts", "909e68c01d94222b8ad2e397a017e2e12e2adb73")
DAVIDSON = ("t-davidson/hate-speech-and-offensive-language", "cb50f7e9eb855a99abc51423bf40df0e26d6fe30")
TOXIGEN = ("microsoft/TOXIGEN", "01517e814639e0334c920a3c502036c8158aac87")
COCONOT = ("allenai/noncompliance", "25bf77cc668814360405cdb8197c4368205806c7")
HH_RLHF = ("anthropics/hh-rlhf", "354e5c3cb8960630860dd5774a6ac2a58313bf4d")

# refusal_direction: model run -> family; how many of each completion set to sample per model.
RD_MODELS = {
    "gemma-2b-it": "gemma",
    "llama-2-7b-chat-hf": "llama",
    "meta-llama-3-8b-instruct": "llama",
    "qwen-1_8b-chat": "qwen",
    "yi-6b-chat": "yi",
}
# (completion set, style, n): baseline answers to harmful and to harmless requests, and steered ones
# (refusal direction added to harmless requests, ablated on harmful ones).
RD_SETS = [
    ("jailbreakbench_baseline", "harmful_request", 80),
    ("harmless_baseline", "harmless_request", 60),
    ("harmless_actadd", "steered_to_refuse", 20),
    ("jailbreakbench_ablation", "steered_to_comply", 20),
]
JBB_MODELS = {"gpt-3.5-turbo-1106": "gpt", "gpt-4-0125-preview": "gpt", "vicuna-13b-v1.5": "llama"}
JBB_SETS = [  # (attack artefact, style, n per model); a model without the file is skipped
    ("PAIR/black_box", "jailbreak_pair", 40),
    ("JBC/manual", "jailbreak_template", 25),
    ("GCG/transfer", "jailbreak_suffix", 25),
]
JBB_VICUNA_PAIR = 30
# CoCoNot's contrast preference pairs: benign requests that look risky, each with GPT-4's answer ("chosen") and
# an unnamed model's worse answer ("rejected"), often an over-refusal. Both sides of COCONOT_PAIRS pairs are taken.
COCONOT_PAIRS = 100
SEED = 20261130


def git_show(repo: Path, commit: str, path: str) -> bytes:
    try:
        return subprocess.run(
            ["git", "-C", str(repo), "show", f"{commit}:{path}"], check=True, capture_output=True
        ).stdout
    except subprocess.CalledProcessError as exc:
        sys.exit(f"{repo}: cannot read {path} at {commit[:12]}: {exc.stderr.decode().strip()}")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def group_key(prompt: str) -> str:
    """Rows that answer the same request share a split: the key is the request, lower-cased, spaces squeezed."""
    return re.sub(r"\s+", " ", prompt.strip().lower())


def split_of(prompt: str) -> str:
    """40% of requests (by sha256 of the group key) are the test split; fixed before any scoring."""
    return "test" if int(sha256(group_key(prompt).encode())[:8], 16) % 100 < 40 else "dev"


def refusal_rows(rd_repo: Path, jbb_repo: Path, coconot_repo: Path) -> tuple[list[dict], dict[str, str]]:
    rng = random.Random(SEED)
    rows, files = [], {}
    for model, family in RD_MODELS.items():
        for name, style, n in RD_SETS:
            path = f"pipeline/runs/{model}/completions/{name}_completions.json"
            raw = git_show(rd_repo, REFUSAL_DIRECTION[1], path)
            files[f"{REFUSAL_DIRECTION[0]}/{path}"] = sha256(raw)
            data = json.loads(raw)
            for i in sorted(rng.sample(range(len(data)), n)):
                item = data[i]
                rows.append(
                    {
                        "id": f"rd:{model}:{name}:{i}",
                        "source": REFUSAL_DIRECTION[0],
                        "model": model,
                        "family": family,
                        "style": style,
                        "prompt": item["prompt"],
                        "goal": item["prompt"],
                        "response": item["response"],
                    }
                )
    for model, family in JBB_MODELS.items():
        sets = JBB_SETS if family == "gpt" else [("PAIR/black_box", "jailbreak_pair", JBB_VICUNA_PAIR)]
        for attack, style, n in sets:
            path = f"attack-artifacts/{attack}/{model}.json"
            raw = git_show(jbb_repo, JBB_ARTIFACTS[1], path)
            files[f"{JBB_ARTIFACTS[0]}/{path}"] = sha256(raw)
            items = [j for j in json.loads(raw)["jailbreaks"] if j.get("response")]
            for j in sorted(rng.sample(items, min(n, len(items))), key=lambda j: j["index"]):
                rows.append(
                    {
                        "id": f"jbb:{model}:{attack.split('/')[0]}:{j['index']}",
                        "source": JBB_ARTIFACTS[0],
                        "model": model,
                        "family": family,
                        "style": style,
                        "prompt": j["prompt"],
                        "goal": j["goal"],
                        "response": j["response"],
                    }
                )
    path = "data/coconot_pref.jsonl"
    raw = git_show(coconot_repo, COCONOT[1], path)
    files[f"{COCONOT[0]}/{path}"] = sha256(raw)
    pairs = [json.loads(line) for line in raw.decode("utf-8").splitlines() if line.strip()]
    for pair in sorted(rng.sample(pairs, COCONOT_PAIRS), key=lambda p: p["id"]):
        for side, model, family in (("chosen", pair["chosen_model"], "gpt"), ("rejected", "unnamed", "unknown")):
            rows.append(
                {
                    "id": f"coconot:{pair['id']}:{side}",
                    "source": COCONOT[0],
                    "model": model or "unnamed",
                    "family": family,
                    "style": f"contrast_{side}",
                    "prompt": pair["prompt"],
                    "goal": pair["prompt"],
                    "response": pair[side],
                }
            )
    for row in rows:
        row["split"] = split_of(row["goal"])
    return rows, files


HH_FILE = "harmless-base/test.jsonl.gz"
HH_SAMPLE, HH_SEED = 150, 20261207


def hh_rows(repo: Path) -> tuple[list[dict], dict[str, str]]:
    """Anthropic's 52B context-distilled assistant (Bai et al. 2022) on red-team requests: the one-turn dialogues of
    HH-RLHF's harmless-base test file, both sides, unique answers, HH_SAMPLE drawn with HH_SEED."""
    raw = git_show(repo, HH_RLHF[1], HH_FILE)
    seen, pool = set(), []
    for i, line in enumerate(gzip.decompress(raw).decode("utf-8").splitlines()):
        pair = json.loads(line)
        for side in ("chosen", "rejected"):
            text = pair[side]
            if text.count("\n\nHuman: ") != 1 or text.count("\n\nAssistant: ") != 1:
                continue
            human, answer = text.split("\n\nAssistant: ")
            answer = answer.strip()
            if answer and answer not in seen:
                seen.add(answer)
                prompt = human.replace("\n\nHuman: ", "").strip()
                pool.append((f"hh:{HH_FILE.split('.')[0]}:{i}:{side}", prompt, answer))
    rows = []
    for k in sorted(random.Random(HH_SEED).sample(range(len(pool)), HH_SAMPLE)):
        row_id, prompt, answer = pool[k]
        rows.append(
            {
                "id": row_id,
                "source": HH_RLHF[0],
                "model": "anthropic-52b-context-distilled",
                "family": "anthropic",
                "style": "red_team_request",
                "prompt": prompt,
                "goal": prompt,
                "response": answer,
                "split": split_of(prompt),
            }
        )
    return rows, {f"{HH_RLHF[0]}/{HH_FILE}": sha256(raw)}


def toxigen_rows(repo: Path) -> tuple[list[dict], dict[str, str]]:
    """Unique statements of ToxiGen's human-curated prompt lists: hate_* -> 1, neutral_* -> 0, with the group."""
    listing = subprocess.run(
        ["git", "-C", str(repo), "ls-tree", "-r", "--name-only", TOXIGEN[1], "prompts/"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    files, seen, rows = {}, set(), []
    for path in sorted(p for p in listing if re.fullmatch(r"prompts/(hate|neutral)_\w+_1k\.txt", p)):
        raw = git_show(repo, TOXIGEN[1], path)
        files[f"{TOXIGEN[0]}/{path}"] = sha256(raw)
        kind, group = re.fullmatch(r"prompts/(hate|neutral)_(\w+)_1k\.txt", path).groups()
        for line in raw.decode("utf-8").splitlines():
            for part in line.split("\\n-"):
                text = part.strip().lstrip("-").strip()
                key = text.lower()
                if len(text) >= 8 and key not in seen:
                    seen.add(key)
                    rows.append({"text": text, "label": int(kind == "hate"), "group": group})
    return rows, files


SMOLLM2_PLAN = {"persona": "neutral_concise", "per_category": 4, "seed": 7, "max_new_tokens": 128}


def smollm2_rows(adapter: Path) -> list[dict]:
    """The bundled model's own answers, base and SFT adapter, to should-refuse and near-miss grammar prompts."""
    sys.path.insert(0, str(ROOT / "src"))
    from selfalign.dataops.pairs import pair_categories, plan_prompts
    from selfalign.persona.schema import load_persona
    from selfalign.runtime.generate import complete_all
    from selfalign.runtime.loader import apply_adapter, load_base, resolve_base_model

    persona, _ = load_persona(ROOT / "personas" / f"{SMOLLM2_PLAN['persona']}.yaml")
    plan, _ = plan_prompts(
        pair_categories(persona, []),
        per_category=SMOLLM2_PLAN["per_category"],
        bait=0,
        holdout_framings=[],
        holdout_categories=[],
        seed=SMOLLM2_PLAN["seed"],
    )
    handle = load_base(resolve_base_model("smollm2_135m"))
    name = apply_adapter(handle, str(adapter), root=str(adapter.parent.parent), name="sft")
    rows = []
    for model, tag in ((None, "base"), (name, "sft")):
        done = complete_all(
            handle, [x.prompt for x in plan], max_new_tokens=SMOLLM2_PLAN["max_new_tokens"], adapter=model, max_batch=16
        )
        for x, c in zip(plan, done, strict=True):
            rows.append(
                {
                    "id": f"smollm2:{tag}:{x.id}",
                    "source": "selfalign (scripts/vendor_judge_data.py smollm2)",
                    "model": "smollm2-135m-instruct" + (f"+{adapter.parent.name}-{adapter.name}" if model else ""),
                    "family": "smollm2",
                    "style": x.kind,
                    "prompt": x.prompt,
                    "goal": x.prompt,
                    "response": c.text,
                    "split": split_of(x.prompt),
                }
            )
    return rows


def check_jsonl(path: Path, rows: list[dict]) -> int:
    """0 when `path` holds exactly `rows`, else 1; says which."""
    same = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] == rows
    print(f"{path}: {'identical' if same else 'DIFFERS'} ({len(rows)} rows)")
    return 0 if same else 1


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    ref = sub.add_parser("refusal")
    ref.add_argument("--refusal-direction", type=Path, required=True)
    ref.add_argument("--jailbreakbench-artifacts", type=Path, required=True)
    ref.add_argument("--coconot", type=Path, required=True, help="a clone of allenai/noncompliance")
    ref.add_argument("--hh-rlhf", type=Path, required=True, help="a clone of anthropics/hh-rlhf")
    ref.add_argument("--check", action="store_true", help="verify responses.jsonl instead of writing it")
    smol = sub.add_parser("smollm2")
    smol.add_argument("--adapter", type=Path, required=True, help="a neutral-concise SFT adapter folder")
    smol.add_argument("--check", action="store_true", help="verify smollm2_responses.jsonl instead of writing it")
    tox = sub.add_parser("toxicity")
    tox.add_argument("--davidson", type=Path, required=True)
    tox.add_argument("--toxigen", type=Path, required=True)
    args = parser.parse_args()

    if args.what == "refusal":
        rows, files = refusal_rows(args.refusal_direction, args.jailbreakbench_artifacts, args.coconot)
        hh, hh_files = hh_rows(args.hh_rlhf)
        rows, files = rows + hh, files | hh_files
        if args.check:
            return check_jsonl(OUT / "refusal" / "responses.jsonl", rows)
        write_jsonl(OUT / "refusal" / "responses.jsonl", rows)
    elif args.what == "smollm2":
        target = OUT / "refusal" / "smollm2_responses.jsonl"
        labels = {}
        if target.is_file():
            labels = {r["id"]: r["label"] for r in map(json.loads, target.read_text(encoding="utf-8").splitlines())}
        rows = [{**r, "label": labels.get(r["id"], "unlabelled")} for r in smollm2_rows(args.adapter)]
        if args.check:
            return check_jsonl(target, rows)
        write_jsonl(target, rows)
        files = {}
    else:
        csv = git_show(args.davidson, DAVIDSON[1], "data/labeled_data.csv")
        (OUT / "toxicity").mkdir(parents=True, exist_ok=True)
        (OUT / "toxicity" / "davidson_labeled_data.csv").write_bytes(csv)
        files = {f"{DAVIDSON[0]}/data/labeled_data.csv": sha256(csv)}
        rows, tg_files = toxigen_rows(args.toxigen)
        files.update(tg_files)
        write_jsonl(OUT / "toxicity" / "toxigen_statements.jsonl", rows)
    print(json.dumps({"rows": len(rows), "files": files}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
