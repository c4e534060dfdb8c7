"""Mail corpora as a stream of :class:`Message`: the SpamAssassin corpus, mbox, Maildir, .eml folders, JSONL.

Every loader yields the message bytes exactly as stored (no decoding, no normalising), with a
label when the source says one (``"ham"``/``"spam"``) and a group (the folder, file or corpus
group it came from). :func:`iter_messages` detects the format of a path.

Labels from names: a group or folder whose name has the word ``spam`` or ``junk`` is spam, one
with the word ``ham`` is ham (``easy_ham_2`` -> ham, ``spam_2`` -> spam, ``.Junk`` -> spam);
anything else is unlabelled (``None``).
"""

from __future__ import annotations

import base64
import binascii
import csv
import mailbox
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson

SPAMASSASSIN_GROUPS = ("easy_ham", "easy_ham_2", "hard_ham", "spam", "spam_2")
# The original corpus names each message <nnnnn>.<md5>; its tarballs also hold a `cmds` script.
_SA_NAME = re.compile(r"^\d{5}\.[0-9a-f]{32}$")
_WORD = re.compile(r"[a-z0-9]+")
LABELS = ("ham", "spam")


@dataclass(frozen=True, slots=True)
class Message:
    raw: bytes
    label: str | None
    group: str
    name: str


def label_from_name(name: str) -> str | None:
    words = set(_WORD.findall(name.lower()))
    if words & {"spam", "junk"}:
        return "spam"
    if "ham" in words:
        return "ham"
    return None


def _norm_label(value: object) -> str | None:
    if value is None:
        return None
    text = str(value).strip().lower()
    if text in LABELS:
        return text
    if text in {"1", "true", "junk"}:
        return "spam"
    if text in {"0", "false", "legit"}:
        return "ham"
    raise ValueError(f"unknown label {value!r} (expected ham or spam)")


def load_spamassassin(data_dir: Path, groups: tuple[str, ...] | None = None) -> Iterator[Message]:
    """The SpamAssassin public corpus under ``data_dir`` (``data/`` or ``data/spamassassin/``), group by group.

    ``groups`` defaults to every group present. Messages come in corpus order (group, then file
    number), which is roughly arrival order within a group.
    """
    root = Path(data_dir)
    if not any((root / g).is_dir() for g in SPAMASSASSIN_GROUPS) and (root / "spamassassin").is_dir():
        root = root / "spamassassin"
    if groups is None:
        groups = tuple(g for g in SPAMASSASSIN_GROUPS if (root / g).is_dir()) or SPAMASSASSIN_GROUPS
    missing = [g for g in groups if not (root / g).is_dir()]
    if missing:
        raise FileNotFoundError(f"SpamAssassin groups {missing} not under {root}: run `make data`")
    for group in groups:
        label = label_from_name(group)
        for path in sorted((root / group).iterdir()):
            if _SA_NAME.match(path.name) and path.is_file():
                yield Message(path.read_bytes(), label, group, path.name)


def iter_mbox(path: Path, label: str | None = None) -> Iterator[Message]:
    """Each message of an mbox file (without its ``From `` separator line)."""
    path = Path(path)
    label = label if label is not None else label_from_name(path.stem)
    box = mailbox.mbox(path, create=False)
    try:
        for i, key in enumerate(box.iterkeys()):
            yield Message(box.get_bytes(key), label, path.stem, f"{path.name}:{i}")
    finally:
        box.close()


def iter_maildir(path: Path, label: str | None = None) -> Iterator[Message]:
    """Each message in a Maildir (``cur`` and ``new``), in a stable order (by file name)."""
    path = Path(path)
    label = label if label is not None else label_from_name(path.name)
    box = mailbox.Maildir(path, factory=None, create=False)
    for key in sorted(box.iterkeys()):
        try:
            raw = box.get_bytes(key)
        except (KeyError, FileNotFoundError):
            continue  # moved or expunged by a mail client while we read: not ours to fail on
        yield Message(raw, label, path.name, key)


def _read_labels(labels_file: Path) -> dict[str, str]:
    """Labels by file: ``<label> <path>`` lines (the TREC spam track index), ``<path><TAB><label>``
    lines, or ``name,label`` CSV rows (a header row is skipped). Keyed by the path as written
    (``./`` dropped) and by its file name, unless two entries share that name."""
    text = Path(labels_file).read_text(encoding="utf-8", errors="replace")
    pairs: list[tuple[str, str]] = []
    if "," in text.split("\n", 1)[0]:
        rows = [r for r in csv.reader(text.splitlines()) if r]
        if rows and rows[0][0].strip().lower() in {"name", "file", "path"}:
            rows = rows[1:]
        pairs = [(r[0].strip(), r[1].strip()) for r in rows if len(r) >= 2]
    else:
        for line in text.splitlines():
            parts = line.split("\t") if "\t" in line else line.split()
            parts = [p.strip() for p in parts if p.strip()]
            if len(parts) >= 2:  # which field is the label: TREC puts it first, a TSV index last
                first_is_label = parts[0].lower() in _LABEL_WORDS and parts[-1].lower() not in _LABEL_WORDS
                pairs.append((parts[1], parts[0]) if first_is_label else (parts[0], parts[-1]))
    labels: dict[str, str] = {}
    by_name: dict[str, list[str]] = {}
    for name, label in pairs:
        norm = _norm_label(label)
        assert norm is not None
        key = name.removeprefix("./")
        labels[key] = norm
        by_name.setdefault(Path(key).name, []).append(norm)
    for base, found in by_name.items():
        if base not in labels and len(found) == 1:  # a file name two entries share says nothing
            labels[base] = found[0]
    return labels


_LABEL_WORDS = frozenset({"ham", "spam", "0", "1", "true", "false", "junk", "legit"})


def iter_eml_dir(path: Path, labels_file: Path | None = None) -> Iterator[Message]:
    """Every file under a folder (recursively, sorted; hidden files skipped), one message per file.

    Labels come from ``labels_file`` (matched by file name) when given, else from the folder names.
    """
    root = Path(path)
    labels = _read_labels(labels_file) if labels_file is not None else None
    skip = {Path(labels_file).resolve()} if labels_file is not None else set()
    for file in sorted(root.rglob("*")):
        rel = file.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not file.is_file() or file.resolve() in skip:
            continue
        group = rel.parent.as_posix() if rel.parent != Path(".") else root.name
        if labels is not None:
            label = labels.get(rel.as_posix(), labels.get(file.name))
        else:
            label = next((lab for part in reversed(rel.parts[:-1]) if (lab := label_from_name(part))),
                         label_from_name(root.name))
        yield Message(file.read_bytes(), label, group, rel.as_posix())


def iter_jsonl(path: Path) -> Iterator[Message]:
    """One JSON object a line: ``raw_b64`` (exact bytes) or ``raw``/``text`` (a string, UTF-8 encoded),
    with optional ``label``, ``group``, ``name``. Blank lines are skipped; a bad line raises ValueError
    naming its line number."""
    path = Path(path)
    with path.open("rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = orjson.loads(line)
                if not isinstance(obj, dict):
                    raise ValueError("not an object")
                if "raw_b64" in obj:
                    raw = base64.b64decode(obj["raw_b64"], validate=True)
                elif isinstance(obj.get("raw", obj.get("text")), str):
                    raw = obj.get("raw", obj.get("text")).encode("utf-8", "surrogateescape")
                else:
                    raise ValueError("no raw_b64, raw or text field")
                label = _norm_label(obj.get("label"))
            except (orjson.JSONDecodeError, binascii.Error, ValueError) as e:
                raise ValueError(f"{path}:{lineno}: {e}") from None
            yield Message(raw, label, str(obj.get("group", path.stem)), str(obj.get("name", f"{path.name}:{lineno}")))


def _is_spamassassin(root: Path) -> bool:
    """A folder with a corpus group holding at least one ``<nnnnn>.<md5>`` file."""
    for group in SPAMASSASSIN_GROUPS:
        if (root / group).is_dir():
            with os.scandir(root / group) as entries:
                if any(_SA_NAME.match(e.name) for e in entries):
                    return True
    return False


def detect(path: Path) -> str:
    """Which loader reads ``path``: ``spamassassin``, ``maildir``, ``eml_dir``, ``jsonl``, ``mbox`` or ``eml``."""
    path = Path(path)
    if path.is_dir():
        if all((path / sub).is_dir() for sub in ("cur", "new")):
            return "maildir"
        if _is_spamassassin(path) or _is_spamassassin(path / "spamassassin"):
            return "spamassassin"
        return "eml_dir"
    if not path.is_file():
        raise FileNotFoundError(path)
    if path.suffix.lower() in {".jsonl", ".ndjson"}:
        return "jsonl"
    with path.open("rb") as f:
        head = f.read(4096).lstrip()
    if head.startswith(b"{"):
        return "jsonl"
    if head.startswith(b"From "):
        return "mbox"
    return "eml"


def iter_messages(path: Path, labels_file: Path | None = None) -> Iterator[Message]:
    """Messages from any supported source, format detected from the path (see :func:`detect`)."""
    path = Path(path)
    kind = detect(path)
    if kind == "maildir":
        return iter_maildir(path)
    if kind == "spamassassin":
        return load_spamassassin(path)
    if kind == "eml_dir":
        return iter_eml_dir(path, labels_file)
    if kind == "jsonl":
        return iter_jsonl(path)
    if kind == "mbox":
        return iter_mbox(path)
    return iter([Message(path.read_bytes(), label_from_name(path.parent.name), path.parent.name, path.name)])
