"""Teacher-written instructions (`synth.instructions`): parsing and repair, the mix classifier, and `stage=synth`
against a scripted OpenAI-compatible stand-in (malformed JSONL, duplicates, leaks, refusals) and the real serve stage.
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from selfalign.dataops.bank import load_bank
from selfalign.dataops.instructions import DOMAIN_BRIEF, MixClassifier, parse_instructions
from selfalign.eval.golden import load_golden
from selfalign.eval.metrics import refusal_detect
from selfalign.utils.hashing import sha256_file
from tests.conftest import GOLDEN, kill_after_chunks
from tests.servers import Server

GOLDEN_PROMPT = load_golden(GOLDEN)[0]["prompt"]


def test_parse_repairs_what_it_can_and_counts_the_rest():
    reply = "\n".join(
        [
            "```jsonl",
            '{"instruction": "Explain how a heat pump moves heat.", "input": "", "target_style_tags": ["plain"]}',
            '1. {"instruction": "List three ways to save water at home.", "target_style_tags": []},',
            'Here you go: {"instruction": "Compare tea and coffee for a morning routine."} hope it helps',
            '{"instruction": "Summarise this text in two lines.", "input": ["not", "a", "string"]}',
            '{"instruction": "broken line", "input": ',
            '{"input": "no instruction here"}',
            '{"instruction": "Hi"}',
            "```",
        ]
    )
    stats = Counter()
    items = parse_instructions(reply, stats, refusal_detect)
    assert [i["instruction"] for i in items] == [
        "Explain how a heat pump moves heat.",
        "List three ways to save water at home.",
        "Compare tea and coffee for a morning routine.",
        "Summarise this text in two lines.",
    ]
    assert items[0]["target_style_tags"] == ["plain"] and items[3]["input"] == ""
    assert stats == Counter({"repaired": 3, "malformed-line": 1, "no-instruction": 1, "length": 1})
    stats = Counter()
    assert parse_instructions("I can't help with that request.", stats, refusal_detect) == []
    assert parse_instructions("Sure, here are some ideas: cooking, travel.", stats, refusal_detect) == []
    assert parse_instructions(None, stats, refusal_detect) == []
    assert stats == Counter({"refused-ask": 1, "no-json": 1, "no-reply": 1})


def test_mix_classifier_on_bank_topics_it_was_not_built_from():
    """Centroids come from each template with its domain's first 4 topics; the rest are held out (measured: domain
    0.891, difficulty 0.772 over 820 instructions; DECISIONS.md)."""
    from selfalign.eval.embedder import embed

    bank = load_bank()
    classify = MixClassifier(bank, embed)
    texts, gold = [], []
    for domain, spec in bank["domains"].items():
        for level, templates in spec["templates"].items():
            for template in templates:
                for topic in spec["topics"][4:]:
                    texts.append(template.format(topic=topic))
                    gold.append((domain, level))
    pred = classify(texts)
    assert sum(p[0] == g[0] for p, g in zip(pred, gold, strict=True)) / len(gold) >= 0.85
    assert sum(p[1] == g[1] for p, g in zip(pred, gold, strict=True)) / len(gold) >= 0.70
    assert classify(["How do I reverse a list in Python?"]) == [("code", "easy")]


class Scripted(BaseHTTPRequestHandler):
    """An OpenAI-compatible stand-in whose replies depend only on the request. Instruction asks get JSONL built from
    the bank's templates with topics of the asked domain, plus a duplicate, a malformed line, a fenced block, a
    Golden-100 prompt, and, for one domain, a refusal; answer asks get two plain sentences."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        system, user = body["messages"][0]["content"], body["messages"][-1]["content"]
        if system.startswith("You design tasks"):
            content = self.instructions(user, body["seed"])
        else:
            asked = user.split("\n")[0].rstrip("?.!")
            content = f"In short, {asked.lower()} comes down to one plain point. It also adds one more fact."
        payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(payload)

    @staticmethod
    def instructions(user: str, seed: int) -> str:
        bank = load_bank()
        domain = next(d for d, brief in DOMAIN_BRIEF.items() if f"Domain: {brief}." in user)
        if domain == "social":
            return "I'm sorry, but I can't help with that."
        level = re.search(r"Difficulty: (\w+)", user).group(1)
        n = int(re.search(r"Write (\d+)", user).group(1))
        rng = random.Random(f"{seed}:{domain}:{level}")
        spec = bank["domains"][domain]
        made = [rng.choice(spec["templates"][level]).format(topic=rng.choice(spec["topics"])) for _ in range(n)]
        lines = [json.dumps({"instruction": m, "input": "", "target_style_tags": ["plain"]}) for m in made]
        lines += [lines[0], '{"instruction": "unterminated', json.dumps({"instruction": GOLDEN_PROMPT})]
        lines[1] = f"2. {lines[1]},"  # a numbered line with a trailing comma: repaired
        return "```jsonl\n" + "\n".join(lines) + "\n```"

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def scripted():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Scripted)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def synth_command(url, out, tmp_path, *extra):
    return [
        sys.executable,
        "-m",
        "selfalign",
        "stage=synth",
        "persona=neutral_concise",
        "teacher=openai",
        f"teacher.base_url={url}",
        "teacher.model=stand-in",
        "synth.chunk_size=10",
        f"synth.out={out}",
        "tracking=none",
        f"paths.output_dir={tmp_path}/outputs",
        f"hydra.run.dir={tmp_path}/run-{out.stem}",
        *extra,
    ]


def test_synth_with_teacher_written_instructions_from_a_scripted_endpoint(scripted, tmp_path):
    out = tmp_path / "teacher.jsonl"
    proc = subprocess.run(synth_command(scripted, out, tmp_path, "synth.n=30"), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    report = json.loads((tmp_path / "run-teacher" / "synth_report.json").read_text())
    stats = report["instructions"]
    assert stats["source"] == "teacher"  # the default for teacher=openai
    # every kind of bad line was met and counted; nothing leaked into the data
    for reason in ("duplicate", "malformed-line", "golden-leak", "refused-ask", "repaired"):
        assert stats[reason] > 0, (reason, stats)
    assert GOLDEN_PROMPT not in {r["instruction"] for r in rows}
    answered = [r for r in rows if not r["metadata"]["safety_tags"][0].startswith(("redline", "near-miss"))]
    by_source = Counter(r["metadata"].get("instruction_source", "bank") for r in answered)
    assert by_source["teacher"] >= len(answered) // 2, by_source
    # the stand-in refuses every social ask, so those slots keep the bank's instruction and the mix holds
    social = [r for r in answered if r["metadata"]["domain"] == "social"]
    assert social and all("instruction_source" not in r["metadata"] for r in social)
    assert stats["bank-fallback"] >= len(social) and stats["placed"] >= by_source["teacher"]
    assert len({r["instruction"] for r in rows}) == len(rows)


def test_killed_run_with_teacher_instructions_resumes_byte_identical(scripted, tmp_path):
    reference = tmp_path / "reference.jsonl"
    ok = subprocess.run(synth_command(scripted, reference, tmp_path, "synth.n=40"), capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr[-3000:]
    out = tmp_path / "killed.jsonl"
    state = out.with_name(out.name + ".state.json")
    command = synth_command(scripted, out, tmp_path, "synth.n=40")
    kill_after_chunks(command, state)
    assert not out.exists() and json.loads(state.read_text())["instructions_seen"]
    resumed = subprocess.run(command, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert sha256_file(out) == sha256_file(reference)


@pytest.mark.slow
def test_synth_asks_the_real_serve_stage_for_instructions(tmp_path):
    """The project's own server (a tiny random model): what it writes is not JSONL, every drop is counted and the
    slots keep the bank's instructions, so the run still ends with its rows."""
    (tmp_path / "adapters").mkdir()
    server = Server(tmp_path / "adapters", tmp_path)
    try:
        out = tmp_path / "served.jsonl"
        command = synth_command(
            f"{server.url}/v1", out, tmp_path, "synth.n=8", "teacher.model=tiny-llama", "teacher.timeout_s=600"
        )  # a loaded CI box: queued asks wait on the tiny model
        proc = subprocess.run(command, capture_output=True, text=True, timeout=900)
    finally:
        server.stop()
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = json.loads((tmp_path / "run-served" / "synth_report.json").read_text())["instructions"]
    asked = sum(v for k, v in stats.items() if k in ("no-json", "malformed-line", "refused-ask", "no-reply"))
    assert asked > 0 and stats["bank-fallback"] > 0, stats
