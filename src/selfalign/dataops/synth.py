"""Persona-enacting synthetic SFT data: plan tasks, let the teacher write answers section by section,
filter, and append accepted rows to a resumable file.

Work is split into chunks. Chunk k's tasks and sampling are drawn from `Random(f"{seed}:{k}")` and the
teacher is seeded from (seed, k), so a chunk's content depends only on the seed, its index and the
rows accepted before it. Accepted rows are appended (and fsynced) to `<out>.partial` and the
progress is recorded in `<out>.state.json` after each chunk; a killed run resumes from there and ends
with the same dataset as an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from selfalign.config import InstructionSource, SynthConfig
from selfalign.dataops.bank import load_bank
from selfalign.dataops.dedup import NearDuplicateIndex
from selfalign.dataops.filter import band_status, dedup_filter, is_refusal_row, run_filters
from selfalign.dataops.teacher import Ask, Sampling
from selfalign.errors import SelfAlignError
from selfalign.persona.style import VERBOSITY_BUDGETS, section_heading
from selfalign.utils.io import read_json, write_json

# The seed's domain mix over 20 slots (60/20/10/5/5) and difficulty over 3 (≈33/33/34).
DOMAIN_SLOTS = ["general"] * 12 + ["reasoning"] * 4 + ["social"] * 2 + ["safety_edge", "code"]
DIFFICULTIES = ["easy", "medium", "hard"]
SECTION_GUIDE = {
    "answer": "answer the question directly",
    "note": "add one short caveat or piece of context",
    "claim": "state your main answer as one clear claim",
    "evidence": "give the evidence or reasoning that supports the claim",
    "counterpoint": "give one limitation, caveat or opposing view",
    "next steps": "suggest what the reader could check or do next",
    "summary": "summarise the answer",
    "steps": "give the concrete steps, in order",
    "pitfalls": "name the common mistakes to avoid",
    "check yourself": "ask one question the reader can use to check their understanding",
}


@dataclass(frozen=True)
class Task:
    id: str
    domain: str
    difficulty: str
    instruction: str
    redline: str | None = None  # the redline category a refusal task hits
    near_miss: str | None = None  # the redline category whose words a benign, answered task shares
    input: str = ""  # the optional input a teacher-written instruction comes with
    instruction_source: str = "bank"  # or "teacher": written by the teacher (synth.instructions)


def redline_categories(persona: dict) -> list[str]:
    """Bank categories the persona's redlines name (by keyword); `generic` when none match."""
    bank = load_bank()
    text = " ".join(persona["redlines"]["safety"] + persona["redlines"]["privacy"]).lower()
    cats = [c for c, words in bank["redline_keywords"].items() if any(w in text for w in words)]
    return cats or ["generic"]


def refusal_category(own: list[str], rng: random.Random) -> str:
    """A refusal row's category: half from the persona's own redline categories, half from the baseline
    every persona refuses (abuse: harassment, slurs, demeaning stereotypes, which the toxicity gate measures)."""
    return rng.choice(own if rng.random() < 0.5 else load_bank()["baseline_redlines"])


def plan_chunk(
    persona: dict,
    chunk: int,
    seed: int,
    size: int,
    refusals: int,
    near_miss_per_refusal: float = 0.0,
    first_slot: int | None = None,
) -> tuple[list[Task], Sampling]:
    """`size` answered tasks in the domain/difficulty mix plus `refusals` redline requests, shuffled; each
    refusal brings `near_miss_per_refusal` (on average) benign, answered near-misses of its category.
    `first_slot` is the chunk's first global slot in the mix schedule (default `chunk * size`)."""
    rng = random.Random(f"{seed}:{chunk}")
    bank = load_bank()
    tasks = []
    for j in range(size):
        # a global slot: every 20 answered rows carry the exact domain mix
        g = (chunk * size if first_slot is None else first_slot) + j
        slots = DOMAIN_SLOTS[:]
        random.Random(f"{seed}:domains:{g // len(slots)}").shuffle(slots)
        domain = slots[g % len(slots)]
        difficulty = DIFFICULTIES[(g + g // 3) % 3]
        spec = bank["domains"][domain]
        template = rng.choice(spec["templates"][difficulty])
        tasks.append(Task(f"c{chunk}-{j}", domain, difficulty, template.format(topic=rng.choice(spec["topics"]))))
    own = redline_categories(persona)
    redlines = persona["redlines"]["safety"] + persona["redlines"]["privacy"]
    categories = []
    for j in range(refusals):
        cat = refusal_category(own, rng)
        categories.append(cat)
        request = rng.choice(bank["redline_requests"][cat]).format(redline=rng.choice(redlines))
        text = rng.choice(bank["redline_framings"]).format(request=request, request_lc=request[0].lower() + request[1:])
        tasks.append(Task(f"c{chunk}-r{j}", "safety_edge", rng.choice(DIFFICULTIES), text, cat))
    # a seeded draw per chunk, so a fractional ratio averages out over chunks
    near = int(refusals * near_miss_per_refusal + random.Random(f"{seed}:near:{chunk}").random())
    for j in range(near):
        cat = categories[j % len(categories)] if categories else rng.choice(own)
        text = rng.choice(bank["near_miss_requests"][cat]).format(redline=rng.choice(redlines))
        tasks.append(Task(f"c{chunk}-n{j}", "safety_edge", rng.choice(DIFFICULTIES), text, near_miss=cat))
    rng.shuffle(tasks)
    sampling = Sampling(round(rng.uniform(0.7, 1.0), 3), round(rng.uniform(0.8, 0.95), 3), seed * 100_000 + chunk)
    return tasks, sampling


def system_prompt(persona: dict) -> str:
    """The seed's answer-generator prompt (§6.2), filled from the persona."""
    style = persona["style"]
    return (
        "You are the model producing answers that enact this persona.\n"
        f"Persona: {persona['description']}\n"
        f"Values: {json.dumps(persona['values'])}\n"
        f"Refusal policy: {persona['refusal_policy']['template']}\n"
        f"STYLE: tone={', '.join(style['tone'])}; structure={style['structure']}; verbosity={style['verbosity']}\n"
        f"Avoid: {'; '.join(persona['taboos'])}. Never help with: "
        f"{'; '.join(persona['redlines']['safety'] + persona['redlines']['privacy'])}. No fake citations."
    )


def section_asks(persona: dict, task: Task) -> list[Ask]:
    """One ask per section of the persona's structure (one plain ask when it has none)."""
    verbosity = persona["style"]["verbosity"]
    n = VERBOSITY_BUDGETS[verbosity].sentences
    limit = f"Use at most {n} sentence{'s' if n > 1 else ''}."
    system = {"role": "system", "content": system_prompt(persona)}
    sections = persona["style"]["structure"] or [None]
    request = f"{task.instruction}\n\n{task.input}" if task.input else task.instruction
    asks = []
    for section in sections:
        heading = section_heading(section) if section else None
        if heading is None:
            content = f"{request}\n\n{limit}"
        else:
            guide = SECTION_GUIDE.get(heading.lower(), f"write the {heading.lower()} part")
            content = f'{request}\n\nWrite only the "{heading}" part of your answer: {guide}. {limit}'
        done = partial(section_done, heading=heading, sentences=n)
        asks.append(Ask([system, {"role": "user", "content": content}], VERBOSITY_BUDGETS[verbosity].tokens, done))
    return asks


# A list marker where a list item starts: at the start, after a line break, a colon, a semicolon or a sentence's end
# ("Pros: 1. Faster; 2. Cheaper", "1. 1. Plant..."). Left in, "1." reads as a sentence of its own.
LIST_MARKER = re.compile(r"(?:^|(?<=[\n:;.!?]))\s*(?:\d{1,2}[.)]|[-•])(?=\s)")
# A sentence: up to a run of . ! ? before a space or the end; "e.g." and the like do not end one.
SENTENCE = re.compile(r"(?:[^.!?]|\b(?:e\.g|i\.e|etc|vs|Mr|Mrs|Ms|Dr)\.)+[.!?]+(?=\s|$)")


def _sentences(prose: str, complete: bool = False) -> list[str]:
    """The sentences of three words or more ("Sure!" or "No." before the answer is not one); with `complete`, only
    those followed by more text, whose end is certain while the teacher is still writing."""
    found = [m for m in SENTENCE.finditer(prose) if not complete or m.end() < len(prose)]
    return [m.group().strip() for m in found if len(m.group().split()) >= 3]


def _scaffold_talk(text: str, heading: str | None) -> bool:
    """The teacher talked about the scaffold ("an 'Evidence' approach") instead of answering."""
    h = re.escape(heading or "")
    return bool(heading) and bool(re.search(rf"[\"“']{h}[\"”']|\b{h}\W+(?:approach|section)\b", text, flags=re.I))


def _prose(text: str, heading: str | None) -> str:
    """The teacher's section as plain prose: no markdown, no list markers, no echoed heading, one paragraph."""
    text = re.sub(r"[*#`_>]+", "", text)
    text = LIST_MARKER.sub(" ", text)
    if heading:
        text = re.sub(rf"^\s*(?:the\s+)?{re.escape(heading)}\s*(?:part)?\s*[:\-–]\s*", "", text, flags=re.I)
    return re.sub(r"\s+", " ", text).strip()


def clean_section(text: str | None, heading: str | None, sentences: int) -> str:
    """Plain prose of at most `sentences` sentences; "" for no text, scaffold talk, or under three words."""
    if not text or _scaffold_talk(text, heading):
        return ""
    text = _prose(text, heading)
    parts = _sentences(text)
    if parts:
        text = " ".join(parts[:sentences])
    elif text:
        text = text.rstrip(",;:- ") + "."
    return text if len(text.split()) >= 3 else ""


def section_done(text: str, heading: str | None, sentences: int) -> bool:
    """Whether the teacher has written all `clean_section` will keep: `sentences` sentences, each followed by
    more text (so its end is certain), or scaffold talk. Generating on would change nothing that is kept."""
    if _scaffold_talk(text, heading):
        return True
    return len(_sentences(_prose(text, heading), complete=True)) >= sentences


def refusal_text(persona: dict, category: str) -> str:
    """The persona's own refusal template, its trailing '...' replaced by a safer alternative, under the
    persona's first section heading (`Answer: I can't provide that. ...`).

    The heading keeps refusals in the same shape as every other answer, so the adapter decides to refuse
    after the heading it always writes, instead of against its most frequent first token."""
    template = persona["refusal_policy"]["template"].rstrip()
    alternative = load_bank()["redline_alternatives"].get(category, load_bank()["redline_alternatives"]["generic"])
    template = re.sub(r"\s*(\.\.\.|…)$", "", template)
    structure = persona["style"]["structure"]
    heading = f"{section_heading(structure[0])}: " if structure else ""
    return f"{heading}{template} {alternative}"


def compose_rows(
    persona: dict,
    persona_id: str,
    tasks: list[Task],
    outputs: dict[str, list[str | None]],
    source: str,
    sampling: Sampling,
) -> list[dict]:
    """Rows in the seed's schema from the teacher's section texts (or the refusal template)."""
    style = persona["style"]
    n = VERBOSITY_BUDGETS[style["verbosity"]].sentences
    style_tags = [*style["tone"], "-".join(style["structure"])] if style["structure"] else list(style["tone"])
    rows = []
    for task in tasks:
        if task.redline:
            output, safety = refusal_text(persona, task.redline), [f"redline:{task.redline}"]
        else:
            sections = style["structure"] or [None]
            texts = [
                clean_section(t, section_heading(s) if s else None, n)
                for s, t in zip(sections, outputs[task.id], strict=True)
            ]
            if style["structure"]:
                output = (
                    ""
                    if not all(texts)
                    else "\n".join(f"{section_heading(s)}: {t}" for s, t in zip(sections, texts, strict=True))
                )
            else:
                output = texts[0]
            if task.near_miss:
                safety = [f"near-miss:{task.near_miss}"]
            else:
                safety = ["borderline-benign"] if task.domain == "safety_edge" else ["benign"]
        rows.append(
            {
                "id": "",  # numbered when accepted
                "persona_id": persona_id,
                "instruction": task.instruction,
                "input": task.input,
                "output": output,
                "metadata": {
                    "values_vector": persona["values"],
                    "style_tags": style_tags,
                    "safety_tags": safety,
                    "source": source,
                    "domain": task.domain,
                    "difficulty": task.difficulty,
                    "sampling": {"temperature": sampling.temperature, "top_p": sampling.top_p},
                    "quality_scores": {"len": len(output.split())},
                },
            }
        )
        if task.instruction_source != "bank":  # bank rows keep the schema (and bytes) they had before
            rows[-1]["metadata"]["instruction_source"] = task.instruction_source
    return rows


def generate_chunk(persona: dict, persona_id: str, teacher, tasks: list[Task], sampling: Sampling) -> list[dict]:
    """Ask the teacher for every section of every answered task in one call, then compose rows."""
    answered = [t for t in tasks if not t.redline]
    per_task = [section_asks(persona, t) for t in answered]
    flat = [a for asks in per_task for a in asks]
    texts = teacher.complete(flat, sampling) if flat else []
    outputs, i = {}, 0
    for task, asks in zip(answered, per_task, strict=True):
        outputs[task.id] = texts[i : i + len(asks)]
        i += len(asks)
    return compose_rows(persona, persona_id, tasks, outputs, f"synthetic-v1:{teacher.name}", sampling)


def generate_synthetic_data(persona_cfg: dict, n: int, seed: int, teacher=None, chunk_size: int = 32) -> list[dict]:
    """Return n raw (instruction, input, output, metadata) rows before filtering (the seed's contract: the filters are
    `filter_records`'s). Without a teacher, the one `stage=synth` uses by default: the default base model and the
    local teacher preset, from the YAML presets."""
    if teacher is None:
        from selfalign.config import compose_typed
        from selfalign.dataops.teacher import LocalTeacher
        from selfalign.runtime.loader import load_base

        cfg = compose_typed()
        teacher = LocalTeacher(load_base(cfg.base_model), batch_size=cfg.teacher.batch_size)
    rows: list[dict] = []
    chunk = 0
    while len(rows) < n:
        tasks, sampling = plan_chunk(persona_cfg, chunk, seed, min(chunk_size, n - len(rows)), 0)
        rows += generate_chunk(persona_cfg, persona_cfg["id"], teacher, tasks, sampling)
        chunk += 1
    for i, row in enumerate(rows, 1):
        row["id"] = f"sft-{i:06d}"
    return rows[:n]


# --------------------------------------------------------------------------- the resumable run


class Scorers:
    """The shared scorers (embedder, refusal detector, toxicity) the filters need, loaded once."""

    def __init__(self, persona: dict):
        from selfalign.eval.embedder import embed
        from selfalign.eval.metrics import refusal_detect, toxicity_scores
        from selfalign.persona.style import style_centroid

        self.embed, self.refusal, self.toxicity = embed, refusal_detect, toxicity_scores
        self.centroid = style_centroid(persona, embed)


class RunFiles:
    """`<out>.partial` (accepted rows, appended) and `<out>.state.json` (where to resume)."""

    def __init__(self, out: Path):
        self.out = out
        self.partial = out.with_name(out.name + ".partial")
        self.state = out.with_name(out.name + ".state.json")

    def load_state(self, config_hash: str) -> dict | None:
        if not self.state.exists() or not self.partial.exists():
            return None
        state = read_json(self.state)
        if state.get("config_hash") != config_hash:
            return None
        with open(self.partial, "r+b") as fh:  # drop anything written after the last recorded chunk
            fh.truncate(state["bytes"])
        return state

    def rows(self) -> list[dict]:
        with open(self.partial, encoding="utf-8") as fh:
            return [json.loads(line) for line in fh if line.strip()]

    def append(self, rows: list[dict], state: dict) -> None:
        with open(self.partial, "a", encoding="utf-8") as fh:
            fh.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
            fh.flush()
            os.fsync(fh.fileno())
            state["bytes"] = fh.tell()
        write_json(state, self.state)

    def reset(self) -> None:
        self.partial.parent.mkdir(parents=True, exist_ok=True)
        self.partial.write_bytes(b"")
        self.state.unlink(missing_ok=True)

    def finish(self) -> None:
        os.replace(self.partial, self.out)
        self.state.unlink(missing_ok=True)


def synthesize(
    persona: dict,
    teacher,
    settings: SynthConfig,
    out: Path,
    config_hash: str,
    golden_prompts: list[str],
    on_chunk: Callable[[dict], None] = lambda s: None,
    *,
    seed: int,
) -> dict:
    """Generate until `settings.n` rows are accepted and the refusal fraction is inside the persona's band.

    `settings.instructions` is resolved (not None): who writes the answered rows' instructions."""
    source = InstructionSource(settings.instructions)
    files = RunFiles(out)
    state = files.load_state(config_hash)
    rows = files.rows() if state else []
    if state is None:
        files.reset()
        state = {"config_hash": config_hash, "chunk": 0, "bytes": 0, "drops": {}, "raw": 0}
        if source is not InstructionSource.bank:
            state |= {"instructions": {}, "instructions_seen": []}
    drops = Counter(state["drops"])
    instruction_stats = Counter(state.get("instructions", {}))
    seen = NearDuplicateIndex(settings.dedup_threshold)  # teacher-written instructions so far (rebuilt on resume)
    for text in state.get("instructions_seen", []):
        seen.add(text)
    index = NearDuplicateIndex(settings.dedup_threshold)
    dedup_filter(rows, index)  # rebuild the index from the rows already accepted
    golden = NearDuplicateIndex(settings.dedup_threshold)
    for prompt in golden_prompts:
        golden.add(prompt)
    scorers = Scorers(persona)
    band = persona["refusal_policy"]["band"]
    target_refusals = round((band[0] + band[1]) / 2 * settings.n)
    while True:
        refusals = sum(is_refusal_row(r) for r in rows)
        _, needed = band_status(refusals, len(rows), band)
        if len(rows) >= settings.n and needed == 0:
            break
        if state["chunk"] >= settings.max_chunks:
            raise SelfAlignError(
                f"synth gave up after {state['chunk']} chunks with {len(rows)}/{settings.n} rows accepted "
                f"(drops: {dict(drops)}); rows so far are kept in {files.partial}"
            )
        remaining = settings.n - len(rows)
        if remaining > 0:  # the last chunks plan only what is still needed, not a whole chunk
            size = min(settings.chunk_size, remaining)
            want = max(0, min(size, round((target_refusals - refusals) * size / remaining)))
            limit = remaining
        else:  # n reached but below the band: add refusal rows only
            want, size, limit = needed, 0, needed
        near = settings.near_miss_per_refusal if size else 0.0  # topping up the band adds refusals only
        first = state["chunk"] * settings.chunk_size
        tasks, sampling = plan_chunk(persona, state["chunk"], seed, size, want, near, first_slot=first)
        added: list[str] = []
        if source is not InstructionSource.bank and size:
            from selfalign.dataops.instructions import teacher_tasks

            tasks, added = teacher_tasks(
                persona,
                teacher,
                tasks,
                sampling,
                mixed=source is InstructionSource.mixed,
                seen=seen,
                golden=golden,
                embed=scorers.embed,
                refusal=scorers.refusal,
                stats=instruction_stats,
            )
        raw = generate_chunk(persona, persona["id"], teacher, tasks, sampling)
        kept = run_filters(
            raw,
            redlines=persona["redlines"]["safety"] + persona["redlines"]["privacy"],
            max_chars=settings.max_chars,
            centroid=scorers.centroid,
            tau=settings.style_tau,
            tox_max=settings.tox_max,
            embed=scorers.embed,
            refusal=scorers.refusal,
            toxicity=scorers.toxicity,
            index=index,
            golden=golden,
            limit=limit,
            drops=drops,
        )
        for row in kept:
            rows.append(row)
            row["id"] = f"sft-{len(rows):06d}"
        state.update(chunk=state["chunk"] + 1, drops=dict(drops), raw=state["raw"] + len(raw))
        if source is not InstructionSource.bank:
            state.update(instructions=dict(instruction_stats), instructions_seen=state["instructions_seen"] + added)
        files.append(kept, state)
        on_chunk({"rows": len(rows), "raw": state["raw"], "chunk": state["chunk"]})
    files.finish()
    result = {"rows": rows, "drops": dict(drops), "raw": state["raw"], "chunks": state["chunk"]}
    return result | {"instructions": {"source": source.value, **dict(sorted(instruction_stats.items()))}}
