"""Persona YAML: validation, normalization, contradiction lints and the stable persona hash.

Every rule has an id (`Issue.rule`); docs/reference.md's "Persona linter rules" table documents each one.
Errors fail the file; warnings are reported and do not.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from selfalign.errors import SelfAlignError
from selfalign.utils.hashing import sha256_json
from selfalign.utils.io import first_alias, read_capped

VALUE_AXES = ("candor", "prudence", "helpfulness", "skepticism", "risk_aversion", "empathy", "neutrality")
VERBOSITY = ("short", "medium", "long")
MAX_DESCRIPTION = 180
MAX_TONE = 6
MAX_SECTIONS = 6
SHORT_MAX_SECTIONS = 3

FIELDS: dict[str, tuple[str, ...] | None] = {
    "id": None,
    "version": None,
    "description": None,
    "values": VALUE_AXES,
    "style": ("tone", "verbosity", "structure"),
    "taboos": None,
    "redlines": ("safety", "privacy"),
    "tie_breaks": None,
    "refusal_policy": ("band", "template"),
}

SLUG = re.compile(r"^[a-z0-9]+(?:[-_][a-z0-9]+)*$")
# semver.org's grammar: MAJOR.MINOR.PATCH, optional -prerelease and +build.
SEMVER = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$"
)
SECTION_NAME = re.compile(r"^[a-z0-9]+(?:_[a-z0-9]+)*$|^[a-z0-9]+(?:-[a-z0-9]+)*$")
PLACEHOLDER = re.compile(r"\b(?:TBD|TBA|TODO|FIXME|XXX|lorem ipsum|placeholder|changeme)\b|\?\?\?|<[^<>\s]+>", re.I)
VAGUE_TONE = frozenset(
    [
        "good",
        "nice",
        "great",
        "fine",
        "ok",
        "okay",
        "cool",
        "awesome",
        "amazing",
        "bad",
        "normal",
        "decent",
        "whatever",
        "stuff",
        "appropriate",
        "proper",
        "generic",
    ]
)
REFUSAL_WORDS = re.compile(r"\b(?:can[’']?t|cannot|won[’']?t|will not|unable|not able|decline|refuse)\b", re.I)
BREVITY_WORDS = re.compile(r"\b(?:brevity|brief|concise|short|terse)\b", re.I)
DETAIL_WORDS = re.compile(r"\b(?:detail|detailed|thorough|exhaustive|elaborate|depth)\b", re.I)


# Every rule the linter applies; errors fail a file, warnings do not. The table in docs/reference.md mirrors this.
RULES: dict[str, str] = {
    "file.missing": "error: the file does not exist (or a glob matches nothing)",
    "file.unreadable": "error: the file cannot be read as UTF-8",
    "file.too_large": "error: the file is over 1 MiB (read no further: a persona is a few KiB)",
    "yaml.alias": "error: a YAML alias (`*name`): refused before parsing, as nested ones expand exponentially",
    "yaml.syntax": "error: YAML syntax error, with line and column",
    "yaml.duplicate-key": "error: a key appears twice in one mapping (YAML would keep only the last)",
    "yaml.not-mapping": "error: the document is empty or not a mapping",
    "field.unknown": "error: a key outside the schema (with a did-you-mean hint)",
    "field.missing": "error: a required field is absent",
    "field.type": "error: a field has the wrong type",
    "field.empty": "error: a required string is empty",
    "id.slug": "error: `id` is not a slug (lowercase letters, digits, '-' or '_')",
    "version.semver": "error: `version` is not a quoted semver string",
    "description.length": "error: `description` is over 180 characters",
    "text.placeholder": "error: any text holds a placeholder (TBD, TODO, FIXME, XXX, ???, <...>, lorem ipsum)",
    "values.missing": "error: one of the 7 value axes is absent",
    "values.type": "error: a value is not a number",
    "values.range": "error: a value is outside [0, 1]",
    "tone.empty": "error: `style.tone` names no descriptor",
    "tone.count": "error: `style.tone` has more than 6 descriptors",
    "tone.vague": "error: a tone descriptor is vague (good, nice, great, fine, ok, ...)",
    "tone.phrase": "warning: a tone descriptor is a phrase of more than 3 words",
    "tone.duplicate": "warning: a tone descriptor repeats",
    "verbosity.enum": "error: `style.verbosity` is not short, medium or long",
    "structure.count": "error: `style.structure` has more than 6 sections",
    "structure.duplicate": "error: a section appears twice in `style.structure`",
    "structure.case": "warning: a section name is not snake_case or kebab-case",
    "list.empty": "error: `taboos`, `redlines.safety`, `redlines.privacy` or `tie_breaks` is empty",
    "list.item": "error: a list item is not a non-empty string",
    "list.duplicate": "warning: a list repeats an item (case and separators ignored)",
    "band.shape": "error: `refusal_policy.band` is not [low, high]",
    "band.range": "error: a band bound is outside [0, 1]",
    "band.order": "error: band low is above high",
    "template.not-refusal": "warning: the refusal template has no refusal wording (can't, won't, unable, ...)",
    "contradiction.taboo-tie-break": "error: the same text is both a taboo and a tie-break",
    "contradiction.short-many-sections": "warning: verbosity `short` with more than 3 sections",
    "contradiction.tie-break-verbosity": "warning: a tie-break favours brevity under `long` or detail under `short`",
    "contradiction.band-redlines": "warning: band high is 0 (never refuse) while redlines are set",
}


@dataclass(frozen=True)
class Issue:
    """One finding: where (`path`, 1-based `line`/`column`), what (`message`), which rule, how bad."""

    path: str
    message: str
    rule: str
    line: int | None = None
    column: int | None = None
    severity: str = "error"

    def __str__(self) -> str:
        where = self.path or "<file>"
        if self.line is not None:
            where += f" (line {self.line}" + (f", col {self.column})" if self.column else ")")
        return f"{where}: {self.message}"


@dataclass
class LintResult:
    file: str
    errors: list[Issue] = field(default_factory=list)
    warnings: list[Issue] = field(default_factory=list)
    persona: dict | None = None  # normalized persona, only when there are no errors

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def persona_hash(self) -> str | None:
        return persona_hash(self.persona) if self.persona is not None else None


def persona_hash(persona: dict) -> str:
    """sha256 of the normalized persona in canonical JSON: formatting, comments and key order do not matter."""
    return sha256_json(persona)


# --------------------------------------------------------------------------- YAML with positions


class _Source:
    """The parsed YAML plus a map from field path to (line, column) for messages."""

    def __init__(self, data: Any, positions: dict[str, tuple[int, int]]):
        self.data = data
        self.positions = positions

    def at(self, path: str) -> tuple[int | None, int | None]:
        """Position of `path`, or of its nearest ancestor that exists in the file."""
        while path:
            if path in self.positions:
                return self.positions[path]
            path = re.sub(r"(\[\d+\]|\.[^.\[]+|^[^.\[]+)$", "", path)
        return self.positions.get("", (None, None))


def _walk(node: yaml.Node, path: str, positions: dict, issues: list[Issue]) -> None:
    positions[path] = (node.start_mark.line + 1, node.start_mark.column + 1)
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = str(key_node.value)
            child = f"{path}.{key}" if path else key
            if key in seen:
                issues.append(
                    Issue(
                        child,
                        "duplicate key (YAML keeps only the last one)",
                        "yaml.duplicate-key",
                        key_node.start_mark.line + 1,
                        key_node.start_mark.column + 1,
                    )
                )
            seen.add(key)
            _walk(value_node, child, positions, issues)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _walk(item, f"{path}[{i}]", positions, issues)


def _read_source(path: Path, issues: list[Issue]) -> _Source | None:
    try:
        text = read_capped(path)
    except FileNotFoundError:
        issues.append(Issue("", "file not found", "file.missing"))
        return None
    except (OSError, UnicodeDecodeError) as exc:
        issues.append(Issue("", f"cannot read file ({exc})", "file.unreadable"))
        return None
    except ValueError as exc:
        issues.append(Issue("", f"file is {exc}: not a persona", "file.too_large"))
        return None
    try:
        alias = first_alias(text)
        if alias is not None:
            issues.append(
                Issue("", "YAML aliases (*name) are not allowed", "yaml.alias", alias.line + 1, alias.column + 1)
            )
            return None
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (None, None)
        issues.append(Issue("", f"YAML syntax error: {exc.problem or exc}", "yaml.syntax", line, col))
        return None
    except yaml.YAMLError as exc:
        issues.append(Issue("", f"YAML error: {exc}", "yaml.syntax"))
        return None
    positions: dict[str, tuple[int, int]] = {}
    if root is not None:
        _walk(root, "", positions, issues)
    return _Source(data, positions)


# --------------------------------------------------------------------------- checks


class _Checker:
    """Collects every issue in one pass and builds the normalized persona alongside."""

    def __init__(self, src: _Source, issues: list[Issue]):
        self.src = src
        self.errors = issues
        self.warnings: list[Issue] = []
        self.normalized: dict[str, Any] = {}

    def error(self, path: str, message: str, rule: str) -> None:
        assert RULES[rule].startswith("error"), rule
        self.errors.append(Issue(path, message, rule, *self.src.at(path)))

    def warn(self, path: str, message: str, rule: str) -> None:
        assert RULES[rule].startswith("warning"), rule
        self.warnings.append(Issue(path, message, rule, *self.src.at(path), severity="warning"))

    # -- field helpers

    def known_keys(self, mapping: dict, allowed: Iterable[str], prefix: str) -> None:
        allowed = list(allowed)
        for key in mapping:
            if key not in allowed:
                path = f"{prefix}.{key}" if prefix else str(key)
                hint = difflib.get_close_matches(str(key), allowed, n=1)
                tip = f"; did you mean '{hint[0]}'?" if hint else f"; allowed: {', '.join(allowed)}"
                self.error(path, f"unknown field{tip}", "field.unknown")

    def mapping(self, data: dict, key: str, prefix: str = "") -> dict | None:
        path = f"{prefix}.{key}" if prefix else key
        value = data.get(key)
        if value is None:
            self.error(path, "missing required field", "field.missing")
            return None
        if not isinstance(value, dict):
            self.error(path, f"must be a mapping, got {type(value).__name__}", "field.type")
            return None
        return value

    def text(self, data: dict, key: str, prefix: str = "") -> str | None:
        path = f"{prefix}.{key}" if prefix else key
        value = data.get(key)
        if value is None:
            self.error(path, "missing required field", "field.missing")
            return None
        if not isinstance(value, str):
            self.error(path, f"must be a string, got {type(value).__name__} ({value!r})", "field.type")
            return None
        value = value.strip()
        if not value:
            self.error(path, "must not be empty", "field.empty")
            return None
        self.placeholder(path, value)
        return value

    def placeholder(self, path: str, value: str) -> None:
        if m := PLACEHOLDER.search(value):
            self.error(path, f"contains the placeholder {m.group(0)!r}; write the real text", "text.placeholder")

    def text_list(
        self, data: dict, key: str, prefix: str = "", *, min_items: int = 1, warn_duplicates: bool = True
    ) -> list[str] | None:
        path = f"{prefix}.{key}" if prefix else key
        value = data.get(key)
        if value is None:
            if min_items:
                self.error(path, "missing required field", "field.missing")
                return None
            value = []
        if not isinstance(value, list):
            self.error(path, f"must be a list of strings, got {type(value).__name__}", "field.type")
            return None
        if len(value) < min_items:
            self.error(path, "must be a non-empty list", "list.empty")
            return None
        items: list[str] = []
        for i, item in enumerate(value):
            if not isinstance(item, str) or not item.strip():
                self.error(f"{path}[{i}]", f"must be a non-empty string, got {item!r}", "list.item")
                continue
            self.placeholder(f"{path}[{i}]", item)
            items.append(item.strip())
        seen: set[str] = set()
        for i, item in enumerate(items):
            if warn_duplicates and _canon(item) in seen:
                self.warn(f"{path}[{i}]", f"{item!r} is listed twice", "list.duplicate")
            seen.add(_canon(item))
        return items

    # -- sections

    def identity(self, data: dict, out: dict) -> None:
        if (pid := self.text(data, "id")) is not None:
            if SLUG.match(pid):
                out["id"] = pid
            else:
                self.error("id", f"{pid!r} is not a slug (lowercase letters, digits, '-' or '_')", "id.slug")
        version = data.get("version")
        if version is not None and not isinstance(version, str):
            self.error("version", f'must be a quoted semver string like "1.2.0", got {version!r}', "version.semver")
        elif (version := self.text(data, "version")) is not None:
            if SEMVER.match(version):
                out["version"] = version
            else:
                self.error("version", f"{version!r} is not semver (MAJOR.MINOR.PATCH, e.g. 0.1.0)", "version.semver")
        if (desc := self.text(data, "description")) is not None:
            if len(desc) > MAX_DESCRIPTION:
                self.error("description", f"is {len(desc)} characters; at most {MAX_DESCRIPTION}", "description.length")
            out["description"] = desc

    def values(self, data: dict, out: dict) -> None:
        values = self.mapping(data, "values")
        if values is None:
            return
        self.known_keys(values, VALUE_AXES, "values")
        vector = {}
        for axis in VALUE_AXES:
            path = f"values.{axis}"
            v = values.get(axis)
            if v is None:
                self.error(path, "missing; all 7 value axes are required", "values.missing")
            elif isinstance(v, bool) or not isinstance(v, (int, float)):
                self.error(path, f"must be a number in [0, 1], got {v!r}", "values.type")
            elif not 0.0 <= v <= 1.0:
                self.error(path, f"{v} is outside [0, 1]", "values.range")
            else:
                vector[axis] = float(v)
        out["values"] = vector

    def style(self, data: dict, out: dict) -> None:
        style = self.mapping(data, "style")
        if style is None:
            return
        self.known_keys(style, FIELDS["style"], "style")
        norm: dict[str, Any] = {}
        norm["tone"] = self.tone(style.get("tone"))
        verbosity = style.get("verbosity")
        if verbosity is None:
            self.error("style.verbosity", "missing required field", "field.missing")
        elif not isinstance(verbosity, str) or verbosity.strip().lower() not in VERBOSITY:
            self.error("style.verbosity", f"{verbosity!r} is not one of {', '.join(VERBOSITY)}", "verbosity.enum")
        else:
            norm["verbosity"] = verbosity.strip().lower()
        structure = self.text_list(style, "structure", "style", min_items=0, warn_duplicates=False)
        if structure is not None:
            self.structure(structure)
            norm["structure"] = structure
        out["style"] = norm

    def tone(self, tone: Any) -> list[str]:
        path = "style.tone"
        if tone is None:
            self.error(path, "missing required field", "field.missing")
            return []
        if isinstance(tone, str):
            parts = [p.strip() for p in tone.split(",")]
        elif isinstance(tone, list) and all(isinstance(p, str) for p in tone):
            parts = [p.strip() for p in tone]
        else:
            self.error(path, "must be comma-separated descriptors or a list of strings", "field.type")
            return []
        parts = [p.lower() for p in parts if p]
        if not parts:
            self.error(path, "must name at least one descriptor", "tone.empty")
            return []
        if len(parts) > MAX_TONE:
            self.error(path, f"has {len(parts)} descriptors; at most {MAX_TONE}", "tone.count")
        for p in parts:
            self.placeholder(path, p)
            if vague := sorted(set(re.findall(r"[a-z]+", p)) & VAGUE_TONE):
                self.error(
                    path, f"{p!r} is vague ({', '.join(vague)}); name the tone itself, e.g. 'plain'", "tone.vague"
                )
            if len(p.split()) > 3:
                self.warn(path, f"{p!r} is a phrase; tone works best as short adjectives", "tone.phrase")
        if len(set(parts)) < len(parts):
            self.warn(path, "repeats a descriptor", "tone.duplicate")
        return parts

    def structure(self, sections: list[str]) -> None:
        path = "style.structure"
        if len(sections) > MAX_SECTIONS:
            self.error(path, f"has {len(sections)} sections; at most {MAX_SECTIONS}", "structure.count")
        seen: set[str] = set()
        for i, name in enumerate(sections):
            if _canon(name) in seen:
                self.error(f"{path}[{i}]", f"section {name!r} appears twice; order is ambiguous", "structure.duplicate")
            seen.add(_canon(name))
            if not SECTION_NAME.match(name):
                self.warn(f"{path}[{i}]", f"{name!r} is not snake_case or kebab-case", "structure.case")

    def redlines(self, data: dict, out: dict) -> None:
        redlines = self.mapping(data, "redlines")
        if redlines is None:
            return
        self.known_keys(redlines, FIELDS["redlines"], "redlines")
        out["redlines"] = {k: self.text_list(redlines, k, "redlines") or [] for k in ("safety", "privacy")}

    def refusal_policy(self, data: dict, out: dict) -> None:
        policy = self.mapping(data, "refusal_policy")
        if policy is None:
            return
        self.known_keys(policy, FIELDS["refusal_policy"], "refusal_policy")
        norm: dict[str, Any] = {}
        band = policy.get("band")
        path = "refusal_policy.band"
        if band is None:
            self.error(path, "missing required field", "field.missing")
        elif (
            not isinstance(band, list)
            or len(band) != 2
            or any(isinstance(b, bool) or not isinstance(b, (int, float)) for b in band)
        ):
            self.error(path, f"must be [low, high] with two numbers, got {band!r}", "band.shape")
        elif not all(0.0 <= b <= 1.0 for b in band):
            self.error(path, f"{band} must lie within [0, 1]", "band.range")
        elif band[0] > band[1]:
            self.error(path, f"low {band[0]} is above high {band[1]}", "band.order")
        else:
            norm["band"] = [float(band[0]), float(band[1])]
        template = self.text(policy, "template", "refusal_policy")
        if template is not None:
            norm["template"] = template
            if not REFUSAL_WORDS.search(template):
                self.warn(
                    "refusal_policy.template",
                    "does not read as a refusal (no can't/cannot/won't/unable/decline); "
                    "refusal detection keys on such wording",
                    "template.not-refusal",
                )
        out["refusal_policy"] = norm

    def contradictions(self, out: dict) -> None:
        """Cross-field lints: settings that each pass alone but cannot all hold."""
        taboos = {_canon(t): t for t in out.get("taboos", [])}
        for i, tb in enumerate(out.get("tie_breaks", [])):
            if _canon(tb) in taboos:
                self.error(
                    f"tie_breaks[{i}]",
                    f"{tb!r} is also a taboo; a heuristic cannot be forbidden",
                    "contradiction.taboo-tie-break",
                )
        style = out.get("style", {})
        verbosity, sections = style.get("verbosity"), style.get("structure", [])
        if verbosity == "short" and len(sections) > SHORT_MAX_SECTIONS:
            self.warn(
                "style.structure",
                f"{len(sections)} sections in a 'short' answer leave each a fragment; "
                f"use at most {SHORT_MAX_SECTIONS} or verbosity 'medium'",
                "contradiction.short-many-sections",
            )
        for i, tb in enumerate(out.get("tie_breaks", [])):
            if verbosity == "long" and BREVITY_WORDS.search(tb):
                self.warn(
                    f"tie_breaks[{i}]",
                    "favours brevity but style.verbosity is 'long'",
                    "contradiction.tie-break-verbosity",
                )
            if verbosity == "short" and DETAIL_WORDS.search(tb):
                self.warn(
                    f"tie_breaks[{i}]",
                    "favours detail but style.verbosity is 'short'",
                    "contradiction.tie-break-verbosity",
                )
        band = out.get("refusal_policy", {}).get("band")
        if band and band[1] == 0.0 and any(out.get("redlines", {}).values()):
            self.warn(
                "refusal_policy.band",
                "high is 0 (never refuse) yet redlines are set; redline hits would fall outside the band",
                "contradiction.band-redlines",
            )


def _canon(text: str) -> str:
    return re.sub(r"[\s_-]+", " ", text.strip().lower())


def _check(src: _Source, issues: list[Issue]) -> _Checker:
    checker = _Checker(src, issues)
    data = src.data
    if not isinstance(data, dict):
        kind = "empty" if data is None else f"a {type(data).__name__}"
        checker.error("", f"a persona must be a YAML mapping; this file is {kind}", "yaml.not-mapping")
        return checker
    checker.known_keys(data, FIELDS, "")
    out: dict[str, Any] = {}
    checker.identity(data, out)
    checker.values(data, out)
    checker.style(data, out)
    out["taboos"] = checker.text_list(data, "taboos") or []
    checker.redlines(data, out)
    out["tie_breaks"] = checker.text_list(data, "tie_breaks") or []
    checker.refusal_policy(data, out)
    checker.contradictions(out)
    checker.normalized = out
    return checker


# --------------------------------------------------------------------------- public API


def lint_persona(path: str | Path) -> LintResult:
    """Every error and warning for one persona file, plus the normalized persona when it passes."""
    issues: list[Issue] = []
    result = LintResult(file=str(path))
    src = _read_source(Path(path), issues)
    if src is None:
        result.errors = issues
        return result
    checker = _check(src, issues)
    result.errors = sorted(checker.errors, key=lambda i: (i.line or 0, i.column or 0))
    result.warnings = checker.warnings
    if not result.errors:
        result.persona = checker.normalized
    return result


def validate_persona_yaml(path: str) -> dict:
    """Load and validate a persona YAML; return the normalized dict or raise ValueError listing all issues."""
    result = lint_persona(path)
    if not result.ok:
        lines = "\n".join(f"  - {issue}" for issue in result.errors)
        raise ValueError(f"{path}: {len(result.errors)} issue(s):\n{lines}")
    return result.persona


def lint_persona_files(paths: list[str]) -> list[tuple[str, bool, list[str]]]:
    """(path, passed, messages) per file; messages hold every error, then warnings prefixed 'warning:'."""
    out = []
    for p in paths:
        r = lint_persona(p)
        out.append((p, r.ok, [str(i) for i in r.errors] + [f"warning: {i}" for i in r.warnings]))
    return out


def load_persona(path: str) -> tuple[dict, str]:
    """The normalized persona and its hash, for stages; a failing file is a SelfAlignError."""
    result = lint_persona(path)
    if not result.ok:
        first = result.errors[0]
        more = f" (+{len(result.errors) - 1} more; run stage=lint)" if len(result.errors) > 1 else ""
        raise SelfAlignError(f"{path}: {first}{more}")
    return result.persona, result.persona_hash


def personas_by_id(persona_dir: str) -> dict[str, Path]:
    """Every valid persona file under `persona_dir`, by persona id."""
    found = {}
    for path in sorted(Path(persona_dir).glob("*.yaml")):
        try:
            persona, _ = load_persona(path)
        except SelfAlignError:
            continue
        found.setdefault(persona["id"], path)
    return found
