"""Reading and writing YAML/JSON/JSONL and whole directories; every write is atomic (temp file or dir + rename)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import yaml

from selfalign.errors import SelfAlignError

UMASK = os.umask(0)  # read once at import: the process umask, restored on the next line
os.umask(UMASK)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` so readers see either the old file or the whole new one, never a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~UMASK)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """A temp dir beside `target` to fill; when the block ends without an error it replaces `target` by renames, so
    readers see the old directory or the whole new one. On an error the temp dir is removed and `target` is
    untouched."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_json(path: str | os.PathLike) -> Any:
    """A JSON file's value; a file that cannot be read, is not UTF-8 or is not JSON is one SelfAlignError naming it
    (these are files a stage wrote and a user may have edited, truncated or made unreadable)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise SelfAlignError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno}); fix or remove it") from None
    except UnicodeDecodeError as exc:
        raise SelfAlignError(f"{path}: not UTF-8 text (byte {exc.start}); fix or remove it") from None
    except OSError as exc:
        raise SelfAlignError(f"{path}: cannot be read ({exc.strerror or exc})") from None


def is_json_with(path: str | os.PathLike, keys: Iterable[str]) -> bool:
    """Whether `path` is a JSON object holding every one of `keys`: how a stage recognises an earlier output of its
    own kind, the one kind of existing file it replaces without being told to (read at most 64 MiB)."""
    try:
        data = json.loads(read_capped(path, 64 << 20))
    except (OSError, ValueError, SelfAlignError):
        return False
    return isinstance(data, dict) and set(keys) <= set(data)


def write_json(obj: Any, path: str | os.PathLike) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


MAX_YAML_BYTES = 1 << 20  # a persona or preset file; the largest shipped one is under 8 KiB


def read_capped(path: str | os.PathLike, max_bytes: int = MAX_YAML_BYTES) -> str:
    """The file's text, reading at most `max_bytes` + 1 bytes, so a huge file or /dev/zero costs no more than that.
    ValueError when it is larger; UnicodeDecodeError when it is not UTF-8; OSError when it cannot be read."""
    with open(path, "rb") as fh:
        data = fh.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ValueError(f"larger than {max_bytes:,} bytes")
    return data.decode("utf-8")


def first_alias(text: str) -> yaml.Mark | None:
    """Where the first YAML alias (`*name`) is, or None. Aliases are refused before a file is composed: nested
    anchors expand exponentially (a few hundred bytes can stand for billions of nodes), and no file of ours needs
    them. Parsing events is linear in the text, so the check itself cannot blow up."""
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.AliasEvent):
            return event.start_mark
    return None


def read_yaml(path: str | os.PathLike) -> Any:
    """A YAML file capped in size and free of aliases; ValueError naming the file (and line) otherwise."""
    try:
        text = read_capped(path)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    mark = first_alias(text)
    if mark is not None:
        raise ValueError(f"{path}: line {mark.line + 1}: YAML aliases (*name) are not allowed")
    return yaml.safe_load(text)


def write_yaml(obj: Any, path: str | os.PathLike) -> None:
    atomic_write_text(path, yaml.safe_dump(obj, sort_keys=False, allow_unicode=True))


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """(line number, value) for each non-blank line; a line that is not UTF-8 or not JSON raises ValueError naming
    the file and the line."""
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(
                    f"{path}:{lineno}: not UTF-8 text (byte {raw[exc.start]:#04x} at column {exc.start + 1})"
                ) from None
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSONL file; a malformed line raises ValueError naming the file and line."""
    return [row for _, row in iter_jsonl(path)]


def write_jsonl(rows: Iterable[dict], path: str | os.PathLike) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
