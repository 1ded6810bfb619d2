"""The persona linter: the shipped personas pass, and each rule fires with its message and position."""

from __future__ import annotations

import copy
import re

import pytest
import yaml

from selfalign.config import PROJECT_ROOT
from selfalign.errors import SelfAlignError
from selfalign.persona.schema import (
    RULES,
    VALUE_AXES,
    lint_persona,
    lint_persona_files,
    load_persona,
    persona_hash,
    validate_persona_yaml,
)
from tests.conftest import PERSONAS

GOOD = yaml.safe_load((PERSONAS / "socratic_skeptical.yaml").read_text())


def write(tmp_path, data, name="p.yaml"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    return path


def mutate(fn):
    data = copy.deepcopy(GOOD)
    fn(data)
    return data


@pytest.mark.parametrize("path", sorted(PERSONAS.glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_personas_pass_without_warnings(path):
    result = lint_persona(path)
    assert result.ok, result.errors
    assert result.warnings == []
    persona = validate_persona_yaml(str(path))
    assert set(persona["values"]) == set(VALUE_AXES)
    assert re.fullmatch(r"[0-9a-f]{64}", result.persona_hash)


def test_normalized_form(tmp_path):
    persona = validate_persona_yaml(str(PERSONAS / "socratic_skeptical.yaml"))
    assert persona["id"] == "socratic-skeptical"
    assert persona["style"] == {
        "tone": ["calm", "precise", "inquisitive"],
        "verbosity": "medium",
        "structure": ["claim", "evidence", "counterpoint", "next-steps"],
    }
    assert persona["refusal_policy"]["band"] == [0.05, 0.15]
    assert list(persona["values"]) == list(VALUE_AXES)


def test_hash_ignores_formatting_and_tracks_content(tmp_path):
    base = lint_persona(PERSONAS / "socratic_skeptical.yaml").persona_hash
    reordered = dict(reversed(list(GOOD.items())))
    reformatted = write(tmp_path, "# a comment\n" + yaml.safe_dump(reordered, default_flow_style=True))
    assert lint_persona(reformatted).persona_hash == base
    changed = write(tmp_path, mutate(lambda d: d["values"].update(candor=0.81)), "changed.yaml")
    assert lint_persona(changed).persona_hash != base
    assert persona_hash(validate_persona_yaml(str(PERSONAS / "socratic_skeptical.yaml"))) == base


def test_all_issues_are_reported_together(tmp_path):
    def break_many(d):
        d["id"] = "Not A Slug"
        d["values"]["candor"] = 2
        d["taboos"] = []

    path = write(tmp_path, mutate(break_many))
    with pytest.raises(ValueError) as exc:
        validate_persona_yaml(str(path))
    text = str(exc.value)
    assert text.startswith(f"{path}: 3 issue(s):")
    assert "id (line 1, col 5): 'Not A Slug' is not a slug" in text
    assert "values.candor" in text and "2 is outside [0, 1]" in text
    assert "taboos" in text and "must be a non-empty list" in text


# (rule, how to break GOOD, expected field path, message fragment)
ERROR_CASES = [
    ("field.unknown", lambda d: d.update(taboo=["x"]), "taboo", "unknown field; did you mean 'taboos'?"),
    ("field.unknown", lambda d: d["values"].update(candour=0.5), "values.candour", "did you mean 'candor'?"),
    ("field.missing", lambda d: d.pop("tie_breaks"), "tie_breaks", "missing required field"),
    ("field.missing", lambda d: d["redlines"].pop("privacy"), "redlines.privacy", "missing required field"),
    ("field.type", lambda d: d.update(description=["a"]), "description", "must be a string, got list"),
    ("field.type", lambda d: d.update(style="calm"), "style", "must be a mapping, got str"),
    (
        "field.empty",
        lambda d: d["refusal_policy"].update(template="  "),
        "refusal_policy.template",
        "must not be empty",
    ),
    ("id.slug", lambda d: d.update(id="Socratic Skeptic"), "id", "is not a slug"),
    ("version.semver", lambda d: d.update(version="1.0"), "version", "'1.0' is not semver"),
    ("version.semver", lambda d: d.update(version=1.0), "version", "must be a quoted semver string"),
    ("description.length", lambda d: d.update(description="x" * 181), "description", "is 181 characters; at most 180"),
    ("text.placeholder", lambda d: d.update(description="TBD"), "description", "contains the placeholder 'TBD'"),
    ("text.placeholder", lambda d: d["taboos"].append("TODO later"), "taboos[1]", "placeholder 'TODO'"),
    ("values.missing", lambda d: d["values"].pop("empathy"), "values.empathy", "all 7 value axes are required"),
    ("values.type", lambda d: d["values"].update(prudence="high"), "values.prudence", "must be a number in [0, 1]"),
    ("values.type", lambda d: d["values"].update(prudence=True), "values.prudence", "must be a number in [0, 1]"),
    ("values.range", lambda d: d["values"].update(candor=1.2), "values.candor", "1.2 is outside [0, 1]"),
    ("values.range", lambda d: d["values"].update(candor=-0.1), "values.candor", "-0.1 is outside [0, 1]"),
    ("tone.empty", lambda d: d["style"].update(tone=" , "), "style.tone", "at least one descriptor"),
    ("tone.count", lambda d: d["style"].update(tone="a1, b2, c3, d4, e5, f6, g7"), "style.tone", "7 descriptors"),
    ("tone.vague", lambda d: d["style"].update(tone="calm, good"), "style.tone", "'good' is vague"),
    ("text.placeholder", lambda d: d["style"].update(tone="calm, TBD"), "style.tone", "placeholder 'tbd'"),
    ("verbosity.enum", lambda d: d["style"].update(verbosity="tiny"), "style.verbosity", "'tiny' is not one of"),
    ("structure.count", lambda d: d["style"].update(structure=list("abcdefg")), "style.structure", "7 sections"),
    ("structure.duplicate", lambda d: d["style"]["structure"].append("claim"), "style.structure[4]", "appears twice"),
    ("list.empty", lambda d: d.update(taboos=[]), "taboos", "must be a non-empty list"),
    ("list.empty", lambda d: d["redlines"].update(safety=[]), "redlines.safety", "must be a non-empty list"),
    ("list.item", lambda d: d["tie_breaks"].append(3), "tie_breaks[1]", "must be a non-empty string"),
    ("band.shape", lambda d: d["refusal_policy"].update(band=[0.1]), "refusal_policy.band", "must be [low, high]"),
    ("band.range", lambda d: d["refusal_policy"].update(band=[0.1, 1.5]), "refusal_policy.band", "within [0, 1]"),
    ("band.order", lambda d: d["refusal_policy"].update(band=[0.3, 0.1]), "refusal_policy.band", "low 0.3 is above"),
    (
        "contradiction.taboo-tie-break",
        lambda d: d["tie_breaks"].append(d["taboos"][0]),
        "tie_breaks[1]",
        "is also a taboo",
    ),
]


@pytest.mark.parametrize(
    ("rule", "breaker", "field", "fragment"), ERROR_CASES, ids=[f"{c[0]}:{c[2]}" for c in ERROR_CASES]
)
def test_error_rules(tmp_path, rule, breaker, field, fragment):
    result = lint_persona(write(tmp_path, mutate(breaker)))
    assert not result.ok
    hits = [i for i in result.errors if i.rule == rule and i.path == field]
    assert hits, [f"{i.rule} {i}" for i in result.errors]
    assert fragment in hits[0].message
    assert hits[0].line is not None  # every field issue carries its line


WARNING_CASES = [
    ("list.duplicate", lambda d: d["taboos"].append(d["taboos"][0].upper()), "taboos[1]", "is listed twice"),
    ("tone.phrase", lambda d: d["style"].update(tone="calm, quietly sure of itself"), "style.tone", "is a phrase"),
    ("tone.duplicate", lambda d: d["style"].update(tone="calm, calm"), "style.tone", "repeats a descriptor"),
    (
        "structure.case",
        lambda d: d["style"].update(structure=["Claim", "next steps"]),
        "style.structure[0]",
        "not snake_case or kebab-case",
    ),
    (
        "template.not-refusal",
        lambda d: d["refusal_policy"].update(template="Let us talk about something else."),
        "refusal_policy.template",
        "does not read as a refusal",
    ),
    (
        "contradiction.short-many-sections",
        lambda d: d["style"].update(verbosity="short", structure=["a", "b", "c", "d"]),
        "style.structure",
        "4 sections in a 'short' answer",
    ),
    (
        "contradiction.tie-break-verbosity",
        lambda d: d["style"].update(verbosity="long") or d["tie_breaks"].append("prefer brevity when unsure"),
        "tie_breaks[1]",
        "favours brevity but style.verbosity is 'long'",
    ),
    (
        "contradiction.tie-break-verbosity",
        lambda d: d["style"].update(verbosity="short") or d["tie_breaks"].append("give detailed derivations"),
        "tie_breaks[1]",
        "favours detail but style.verbosity is 'short'",
    ),
    (
        "contradiction.band-redlines",
        lambda d: d["refusal_policy"].update(band=[0, 0]),
        "refusal_policy.band",
        "high is 0 (never refuse) yet redlines are set",
    ),
]


@pytest.mark.parametrize(
    ("rule", "breaker", "field", "fragment"), WARNING_CASES, ids=[f"{c[0]}:{c[2]}" for c in WARNING_CASES]
)
def test_warning_rules_do_not_fail(tmp_path, rule, breaker, field, fragment):
    result = lint_persona(write(tmp_path, mutate(breaker)))
    assert result.ok, result.errors
    hits = [i for i in result.warnings if i.rule == rule and i.path == field]
    assert hits, [f"{i.rule} {i}" for i in result.warnings]
    assert fragment in hits[0].message
    assert hits[0].severity == "warning"


def test_yaml_syntax_error_has_line_and_column(tmp_path):
    path = write(tmp_path, "id: x\nvalues: [0.1, 0.2\nstyle: {}\n")
    result = lint_persona(path)
    (issue,) = result.errors
    assert issue.rule == "yaml.syntax"
    assert issue.line == 3 and issue.column == 6
    assert "YAML syntax error: expected ',' or ']'" in issue.message


def test_duplicate_yaml_key(tmp_path):
    text = (PERSONAS / "neutral_concise.yaml").read_text() + 'taboos: ["another"]\n'
    result = lint_persona(write(tmp_path, text))
    dup = [i for i in result.errors if i.rule == "yaml.duplicate-key"]
    assert dup and dup[0].path == "taboos" and dup[0].line == text.count("\n")
    assert "YAML keeps only the last one" in dup[0].message


@pytest.mark.parametrize(("text", "kind"), [("", "empty"), ("- a\n- b\n", "a list")])
def test_not_a_mapping(tmp_path, text, kind):
    (issue,) = lint_persona(write(tmp_path, text)).errors
    assert issue.rule == "yaml.not-mapping" and f"this file is {kind}" in issue.message


ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi", strict=True)
)  # 9^9 = 387 million leaves in about 300 bytes


def test_alias_bomb_is_refused_before_parsing(tmp_path):
    (issue,) = lint_persona(write(tmp_path, ALIAS_BOMB)).errors
    assert len(ALIAS_BOMB) < 400
    assert issue.rule == "yaml.alias" and (issue.line, issue.column) == (2, 8)
    with pytest.raises(SelfAlignError, match=r"line 2, col 8\): YAML aliases \(\*name\) are not allowed"):
        load_persona(write(tmp_path, ALIAS_BOMB))


def test_file_is_capped_before_reading_it_all(tmp_path):
    (issue,) = lint_persona("/dev/zero").errors  # endless: read up to the cap and no further
    assert issue.rule == "file.too_large" and "larger than 1,048,576 bytes" in issue.message
    big = tmp_path / "big.yaml"
    big.write_text("id: x\n" + "# padding\n" * 120_000)
    assert [i.rule for i in lint_persona(big).errors] == ["file.too_large"]


def test_missing_file(tmp_path):
    (issue,) = lint_persona(tmp_path / "nope.yaml").errors
    assert issue.rule == "file.missing" and issue.message == "file not found"


def test_lint_persona_files_contract(tmp_path):
    bad = write(tmp_path, mutate(lambda d: d.update(id="Bad Id")))
    good = str(PERSONAS / "neutral_concise.yaml")
    rows = lint_persona_files([good, str(bad)])
    assert rows[0] == (good, True, [])
    assert rows[1][0] == str(bad) and rows[1][1] is False
    assert any("is not a slug" in m for m in rows[1][2])


def test_every_rule_is_documented_and_tested():
    tested = {c[0] for c in ERROR_CASES + WARNING_CASES}
    tested |= {"yaml.syntax", "yaml.duplicate-key", "yaml.not-mapping", "file.missing", "yaml.alias", "file.too_large"}
    assert set(RULES) - tested == {"file.unreadable"}
    readme = (PROJECT_ROOT / "docs" / "reference.md").read_text()
    assert [r for r in RULES if f"| `{r}` |" not in readme] == []
