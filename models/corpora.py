"""An operator's own labelled mail, as training and evaluation sets (``floodgate model train|evaluate
--corpus PATH``).

A corpus is named on the command line as ``PATH`` (labels from the source) or ``ham=PATH`` /
``spam=PATH`` (every message of it has that label). What ``PATH`` may be:

* a **Maildir tree**: every folder under it with ``cur/`` and ``new/`` (the root's own INBOX,
  Maildir++ ``.Junk``, ``.INBOX.Spam``, Dovecot's ``LAYOUT=fs`` ``Junk/``, or ``ham/`` and
  ``spam/`` Maildirs side by side); a folder with ``junk`` or ``spam`` in its name is spam,
  ``Trash``, ``Drafts`` and the like are left out (counted: a deleted or unsent message is neither),
  every other folder is ham; ``--folder-label NAME=LABEL`` overrides any of that per folder
  (``NAME`` is the folder's name without the leading dot, e.g. ``Junk`` or ``INBOX.Newsletters``,
  or its last part; ``LABEL`` is ``ham``, ``spam`` or ``skip``);
* an **mbox** file (label from its name: ``spam.mbox``, ``Junk``, or given as ``spam=PATH``);
* a **folder of files**, one message each (``.eml`` or any name; ``*.mbox`` files in it are read
  as mboxes), labels from a ``labels.tsv``, ``labels.csv``, ``labels.txt`` or TREC ``index`` file
  in it, else from the folder names (``ham/``, ``spam/``);
* a **JSONL** file (``raw_b64`` or ``raw``/``text``, ``label``); or the SpamAssassin corpus layout.

Nothing is skipped silently. Unreadable and empty files, messages without a label and duplicate
copies within a label are left out and *counted* (:attr:`Corpus.warnings`, printed and recorded on
the model card); a message that appears with both labels is an error (:class:`CorpusError`) unless
``conflicts="drop"``, which leaves out every copy and counts them; a training set with no ham or
no spam is an error. Duplicates are found by :func:`digest` (the bytes with line ends unified and
an mbox ``From`` line dropped).

Held out: each operator corpus is split by Date, per label: its newest :data:`HOLDOUT` never
trains the model; it joins the evaluation set (with the SpamAssassin time split's test part when
the base corpus is used), on which the card's metrics and the promotion gates are measured. New
mail added later only ever joins the held-out end, so a model's held-out messages stay unseen.
"""

from __future__ import annotations

import hashlib
import mailbox
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models import corpus as loaders
from models import online, splits
from models.corpus import Message

HOLDOUT = 0.2  # newest fifth of each label of each operator corpus: measured, never trained on
LABELS = ("ham", "spam")
# Maildir folders that hold neither ham nor spam by default: deleted mail (users delete spam
# too), unsent drafts, queued mail. Named by their last part, case-insensitively.
SKIPPED_FOLDERS = frozenset({"trash", "deleted", "deleted items", "deleted messages", "drafts", "outbox",
                             "templates", "bin"})
LABEL_FILES = ("labels.tsv", "labels.csv", "labels.txt", "index")  # looked for in a folder of files
MAX_EXAMPLES = 3  # paths named per warning or error


class CorpusError(ValueError):
    """A corpus that cannot be used as given: unreadable, unlabelled, self-contradicting, one-sided."""


@dataclass(frozen=True)
class Spec:
    """One ``--corpus`` argument."""

    path: Path
    label: str | None = None  # every message gets this label (ham=PATH / spam=PATH)

    @classmethod
    def parse(cls, text: str) -> Spec:
        """``PATH``, ``ham=PATH`` or ``spam=PATH``; the path made absolute (a model card records it,
        and ``promote`` reads the corpus again from wherever it runs)."""
        head, sep, rest = text.partition("=")
        if sep and head.lower() in LABELS:
            return cls(Path(rest).expanduser().absolute(), head.lower())
        return cls(Path(text).expanduser().absolute())

    def __str__(self) -> str:
        return f"{self.label}={self.path}" if self.label else str(self.path)


@dataclass
class Corpus:
    """The labelled messages of one corpus, and what was left out of it and why."""

    spec: Spec
    kind: str
    messages: list[Message]
    labels_from: str
    warnings: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.spec.path.name or str(self.spec.path)

    def warn(self, reason: str, where: str, n: int = 1) -> None:
        self.warnings[reason] += n
        shown = self.examples.setdefault(reason, [])
        if len(shown) < MAX_EXAMPLES:
            shown.append(where)

    def summary(self) -> dict[str, Any]:
        """What the model card records: name, where, format, counts, fingerprint, what was left out."""
        fp = splits.fingerprint(self.messages)
        return {"name": self.name, "spec": str(self.spec), "path": str(self.spec.path.resolve()), "format": self.kind,
                "labels_from": self.labels_from, "messages": fp["messages"], "labels": fp["labels"],
                "sha256": fp["sha256"], "left_out": dict(self.warnings),
                "left_out_examples": {k: v for k, v in self.examples.items()}}


_MBOX_QUOTED = re.compile(rb"^>(>*From )", re.M)  # what mbox writers do to a body line starting "From "


def digest(raw: bytes) -> str:
    """Identity of a message across stores: its bytes with CRLF as LF, trailing white space and an
    mbox ``From`` separator line dropped, ``>From`` lines unquoted (Maildir, mbox and .eml copies of
    one message agree)."""
    if raw.startswith(b"From "):
        raw = raw[raw.find(b"\n") + 1:]
    return hashlib.sha256(_MBOX_QUOTED.sub(rb"\1", raw.replace(b"\r\n", b"\n")).rstrip()).hexdigest()


def _maildirs(root: Path) -> list[tuple[str, Path]]:
    """(folder name, path) of every Maildir under ``root``, the root's own first ("INBOX")."""
    found: list[tuple[str, Path]] = []
    for here, dirs, _files in os.walk(root):
        d = Path(here)
        if (d / "cur").is_dir() and (d / "new").is_dir():
            rel = d.relative_to(root).as_posix()
            found.append(("INBOX" if rel == "." else rel.removeprefix(".").replace("/.", "."), d))
        dirs[:] = sorted(x for x in dirs if x not in ("cur", "new", "tmp"))
    return found


def folder_label(folder: str, folder_labels: dict[str, str]) -> str | None:
    """``ham``, ``spam`` or None (skip) for a Maildir folder or sub-folder name."""
    parts = [p for p in folder.replace("/", ".").split(".") if p]
    for key in (folder, *(parts[-1:])):
        for name, label in folder_labels.items():
            if name.lower().removeprefix(".") == key.lower():
                return None if label == "skip" else label
    named = loaders.label_from_name(folder.replace(".", " "))
    if named:
        return named
    if parts and parts[-1].lower() in SKIPPED_FOLDERS:
        return None
    return "ham"


def _read_maildir(c: Corpus, folder_labels: dict[str, str]) -> None:
    for folder, path in _maildirs(c.spec.path):
        label = c.spec.label or folder_label(folder, folder_labels)
        if label is None:
            n = sum(1 for sub in ("cur", "new") for _ in (path / sub).iterdir())
            if n:
                c.warn(f"folder not used for training (neither ham nor spam; --folder-label {folder}=ham "
                       "to use it)", folder, n)
            continue
        for sub in ("new", "cur"):
            for file in sorted((path / sub).iterdir()):
                if file.name.startswith("."):
                    continue
                _add_file(c, file, label, folder, f"{folder}/{sub}/{file.name}")


def _add_file(c: Corpus, file: Path, label: str | None, group: str, name: str) -> None:
    try:
        raw = file.read_bytes()
    except OSError as e:
        c.warn(f"unreadable file ({type(e).__name__})", str(file))
        return
    if not raw.strip():
        c.warn("empty file", str(file))
        return
    if label is None:
        c.warn("no label (name it in a labels file, or give the corpus as ham=PATH / spam=PATH)", str(file))
        return
    c.messages.append(Message(raw, label, group, name))


def _read_mbox(c: Corpus, path: Path, group: str) -> None:
    label = c.spec.label or loaders.label_from_name(path.stem)
    try:
        box = mailbox.mbox(path, create=False)
        keys = list(box.iterkeys())
    except OSError as e:
        c.warn(f"unreadable mbox ({type(e).__name__})", str(path))
        return
    if label is None:
        if keys:
            c.warn("no label (name the mbox ham.mbox / spam.mbox, or give it as ham=PATH / spam=PATH)",
                   str(path), len(keys))
        box.close()
        return
    try:
        for i, key in enumerate(keys):
            raw = box.get_bytes(key)
            where = f"{path.name}:{i}"
            if not raw.strip():
                c.warn("empty message", where)
                continue
            c.messages.append(Message(raw, label, group, where))
    finally:
        box.close()


def _labels_file(root: Path) -> Path | None:
    return next((root / n for n in LABEL_FILES if (root / n).is_file()), None)


def _read_files(c: Corpus) -> None:
    root = c.spec.path
    index = _labels_file(root)
    labels = loaders._read_labels(index) if index else None
    if index:
        c.labels_from = index.name
    for file in sorted(root.rglob("*")):
        rel = file.relative_to(root)
        if any(p.startswith(".") for p in rel.parts) or file == index or not (file.is_file() or file.is_symlink()):
            continue
        group = rel.parent.as_posix() if rel.parent != Path(".") else root.name
        if file.suffix.lower() == ".mbox":
            _read_mbox(c, file, group)
            continue
        if c.spec.label:
            label: str | None = c.spec.label
        elif labels is not None:
            label = labels.get(rel.as_posix(), labels.get(file.name))
        else:
            label = next((lab for part in reversed(rel.parts[:-1]) if (lab := loaders.label_from_name(part))),
                         loaders.label_from_name(root.name))
        _add_file(c, file, label, group, rel.as_posix())


def read(spec: Spec, folder_labels: dict[str, str] | None = None) -> Corpus:
    """Every labelled message of one corpus, with what was left out counted. Raises CorpusError
    when the path does not exist or holds no usable message at all."""
    path = spec.path
    if not path.exists():
        raise CorpusError(f"corpus {spec}: no such file or folder")
    folder_labels = folder_labels or {}
    if path.is_dir():
        kind = ("maildir" if _maildirs(path) else "spamassassin" if loaders.detect(path) == "spamassassin"
                else "files")
    else:
        kind = loaders.detect(path)
    labels_from = "the --corpus label" if spec.label else {"maildir": "folder names", "mbox": "the file name",
                                                            "jsonl": "each line's label"}.get(kind, "folder names")
    c = Corpus(spec, kind, [], labels_from)
    try:
        if kind == "maildir":
            _read_maildir(c, folder_labels)
        elif kind == "mbox":
            _read_mbox(c, path, path.stem)
        elif kind == "files":
            _read_files(c)
        else:
            for m in loaders.iter_messages(path):
                label = spec.label or m.label
                if label is None:
                    c.warn("no label", f"{path.name}:{m.name}")
                else:
                    c.messages.append(Message(m.raw, label, m.group, m.name))
    except (ValueError, OSError) as e:  # a bad JSONL line, an unreadable folder: name it and stop
        raise CorpusError(f"corpus {spec}: {e}") from None
    if not c.messages:
        left = ", ".join(f"{n} {r}" for r, n in c.warnings.items()) or "nothing found"
        raise CorpusError(f"corpus {spec} ({kind}) holds no usable labelled message ({left})")
    return c


def deduplicate(corpora: Sequence[Corpus], base: Sequence[Message] = (), conflicts: str = "error") -> None:
    """Drop repeated copies within a label (counted on the corpus that had the later copy); a
    message with both labels raises CorpusError, or with ``conflicts="drop"`` loses every copy
    (counted). ``base`` (the SpamAssassin corpus) is checked against, never changed."""
    if conflicts not in ("error", "drop"):
        raise ValueError("conflicts must be 'error' or 'drop'")
    seen: dict[str, tuple[str, str]] = {digest(m.raw): (m.label or "", f"base:{m.group}/{m.name}") for m in base}
    labels_of: dict[str, set[str]] = {}
    for c in corpora:
        for m in c.messages:
            labels_of.setdefault(digest(m.raw), set()).add(m.label or "")
    for key, (label, _) in seen.items():
        if key in labels_of:
            labels_of[key].add(label)
    clashing = {k for k, labs in labels_of.items() if len(labs) > 1}
    if clashing and conflicts == "error":
        where = [f"{m.name} ({m.label}) in {c.spec}" for c in corpora for m in c.messages if digest(m.raw) in clashing]
        raise CorpusError(f"{len(clashing)} message(s) appear as both ham and spam, e.g. "
                          + "; ".join(where[:MAX_EXAMPLES])
                          + ": fix the labels, or --conflicts drop to leave every copy out")
    for c in corpora:
        kept: list[Message] = []
        for m in c.messages:
            key = digest(m.raw)
            if key in clashing:
                c.warn("labelled both ham and spam (every copy left out)", m.name)
            elif key in seen:
                first = seen[key][1]
                c.warn("duplicate of a message in the base corpus" if first.startswith("base:")
                       else "duplicate of a message read before (one copy kept)", f"{m.name} = {first}")
            else:
                seen[key] = (m.label or "", f"{c.name}:{m.name}")
                kept.append(m)
        c.messages = kept


def holdout_split(messages: Sequence[Message], fraction: float = HOLDOUT) -> tuple[list[Message], list[Message]]:
    """(train, held out): per label, the newest ``fraction`` by Date header held out (undated
    messages keep their place in the corpus's order; see :func:`models.online.chronological`)."""
    train: list[Message] = []
    held: list[Message] = []
    for label in LABELS:
        mine = online.chronological([m for m in messages if m.label == label])
        cut = len(mine) - round(len(mine) * fraction)
        train += mine[:cut]
        held += mine[cut:]
    return train, held


def read_all(specs: Iterable[Spec], folder_labels: dict[str, str] | None = None, base: Sequence[Message] = (),
             conflicts: str = "error") -> list[Corpus]:
    """Every corpus read, deduplicated across all of them and against ``base``."""
    corpora = [read(s, folder_labels) for s in specs]
    deduplicate(corpora, base, conflicts)
    return corpora


def require_both_labels(messages: Sequence[Message], what: str) -> None:
    counts = Counter(m.label for m in messages)
    missing = [lab for lab in LABELS if counts[lab] == 0]
    if missing:
        raise CorpusError(f"{what} has no {' and no '.join(missing)} ({counts['ham']} ham, {counts['spam']} spam): "
                          "a model needs both; add a spam folder (a Junk Maildir, spam=PATH) or a ham one, "
                          "or train with the base corpus (--with-base)")


def iter_labelled(corpora: Iterable[Corpus]) -> Iterator[Message]:
    for c in corpora:
        yield from c.messages


def warnings_text(corpora: Iterable[Corpus]) -> list[str]:
    """One line per counted reason, with example paths."""
    out = []
    for c in corpora:
        for reason, n in c.warnings.items():
            out.append(f"warning: {c.spec}: {n} left out: {reason} (e.g. {', '.join(c.examples.get(reason, []))})")
    return out
