"""Peer comparison: bogofilter (and SpamAssassin, when installed) on the same corpus splits as our model.

Each peer is trained on the split's training messages and scores its test messages, through its
own command-line tools, from the corpus files as they are (peers see every header, collection
artefacts included; our model does not). Results go to BENCHMARKS.md (its peers section).
"""

from __future__ import annotations

import resource
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from models import metrics, splits, train
from models.corpus import Message, load_spamassassin

SECTION_START = "<!-- bench-peers:start -->"
SECTION_END = "<!-- bench-peers:end -->"
BOGOFILTER_SPAM_CUTOFF = 0.99  # bogofilter's compiled-in default spam_cutoff (Debian's config keeps it)
CHUNK = 500  # file names per bogofilter call: far below ARG_MAX


def _paths(root: Path, messages: Sequence[Message]) -> list[str]:
    return [str(root / m.group / m.name) for m in messages]


def _child_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def bogofilter(root: Path, train_msgs: Sequence[Message], test_msgs: Sequence[Message]) -> dict[str, Any]:
    exe = shutil.which("bogofilter")
    if exe is None:
        raise FileNotFoundError("bogofilter is not installed (apt-get install bogofilter)")
    with tempfile.TemporaryDirectory(prefix="bogofilter-") as db:
        for label, flag in (("ham", "-n"), ("spam", "-s")):
            files = _paths(root, [m for m in train_msgs if m.label == label])
            for i in range(0, len(files), CHUNK):
                subprocess.run([exe, "-d", db, flag, "-B", *files[i:i + CHUNK]], check=True)
        files = _paths(root, test_msgs)
        scores: dict[str, float] = {}
        cpu0 = _child_cpu()
        for i in range(0, len(files), CHUNK):
            out = subprocess.run([exe, "-d", db, "-T", "-B", *files[i:i + CHUNK]], capture_output=True, text=True)
            if out.returncode not in (0, 1, 2):  # 0 spam, 1 ham, 2 unsure (of the last message); 3 is an error
                raise RuntimeError(f"bogofilter failed: {out.stderr.strip()}")
            for line in out.stdout.splitlines():
                name, _, score = line.rsplit(" ", 2)
                scores[name] = float(score)
        cpu = _child_cpu() - cpu0
    s = np.array([scores[f] for f in files])
    m = metrics.metrics(train.targets(test_msgs), s, BOGOFILTER_SPAM_CUTOFF)
    m["cpu_ms_per_msg"] = round(1000 * cpu / len(files), 3)
    return m


# One Perl process scores every message (rules compiled once), where `spamassassin` per message
# would pay ~2 s of start-up each time. Network tests are off (local_tests_only): no DNS or URIBL.
_SA_SCORER = r"""
use strict; use warnings;
use Mail::SpamAssassin;
my ($prefs) = @ARGV;
my $sa = Mail::SpamAssassin->new({userprefs_filename => $prefs, local_tests_only => 1, dont_copy_prefs => 1});
$sa->compile_now(0);
$| = 1;
while (my $path = <STDIN>) {
  chomp $path;
  open(my $fh, '<:raw', $path) or die "$path: $!";
  my $raw = do { local $/; <$fh> };
  close $fh;
  my $mail = $sa->parse($raw);
  my $status = $sa->check($mail);
  printf "%s\t%.3f\n", $path, $status->get_score();
  $status->finish(); $mail->finish();
}
"""
SA_REQUIRED_SCORE = 5.0  # SpamAssassin's default required_score


def spamassassin(root: Path, train_msgs: Sequence[Message], test_msgs: Sequence[Message]) -> dict[str, Any]:
    """SpamAssassin's rules plus its Bayes filter trained on the split (sa-learn), no network tests."""
    learn, perl = shutil.which("sa-learn"), shutil.which("perl")
    if learn is None or perl is None:
        raise FileNotFoundError("SpamAssassin is not installed (apt-get install spamassassin)")
    with tempfile.TemporaryDirectory(prefix="spamassassin-") as home:
        prefs = Path(home) / "user_prefs"
        prefs.write_text(f"bayes_path {home}/bayes\nuse_bayes 1\nbayes_auto_learn 0\n")
        for label, flag in (("ham", "--ham"), ("spam", "--spam")):
            files = _paths(root, [m for m in train_msgs if m.label == label])
            for i in range(0, len(files), CHUNK):
                subprocess.run([learn, "-p", str(prefs), flag, *files[i:i + CHUNK]], check=True, capture_output=True)
        files = _paths(root, test_msgs)
        script = Path(home) / "score.pl"
        script.write_text(_SA_SCORER)
        cpu0 = _child_cpu()
        out = subprocess.run([perl, str(script), str(prefs)], input="\n".join(files) + "\n", capture_output=True,
                             text=True, check=True)
        cpu = _child_cpu() - cpu0
    scores = dict(line.rsplit("\t", 1) for line in out.stdout.splitlines())
    m = metrics.metrics(train.targets(test_msgs), np.array([float(scores[f]) for f in files]), SA_REQUIRED_SCORE)
    m["cpu_ms_per_msg"] = round(1000 * cpu / len(files), 1)
    m["scored"] = len(files)
    return m


def compare(data_dir: Path, peers: Sequence[str] = ("bogofilter",), sa_sample: int = 0) -> dict[str, Any]:
    corpus = list(load_spamassassin(data_dir))
    root = Path(data_dir)
    if not (root / "easy_ham").is_dir():
        root = root / "spamassassin"
    results: dict[str, Any] = {}
    for split_name, (tr, te) in (("time", splits.time_split(corpus)), ("random", splits.random_split(corpus))):
        row: dict[str, Any] = {}
        fitted = train.fit(tr)
        cpu0 = time.process_time()
        scores = train.score(fitted.pipeline, te)
        cpu = time.process_time() - cpu0
        row["floodgate"] = metrics.metrics(train.targets(te), scores, fitted.threshold)
        row["floodgate"]["cpu_ms_per_msg"] = round(1000 * cpu / len(te), 3)
        if "bogofilter" in peers:
            row["bogofilter"] = bogofilter(root, tr, te)
        if "spamassassin" in peers:
            sample = te[:: max(1, len(te) // sa_sample)] if sa_sample else te  # every k-th: both groups
            row["spamassassin"] = spamassassin(root, tr, sample)
        results[split_name] = row
    return results


def markdown(results: dict[str, Any], command: str) -> str:
    lines = [SECTION_START, "## Peers: the same splits, other filters", "",
             f"Command: `{command}`. Time split: train easy_ham + hard_ham + spam, test easy_ham_2 + spam_2; random "
             f"split: seeded stratified 70/30. Each filter at its own decision point: Floodgate's threshold chosen "
             f"for ham FPR <= 0.1 % on its training folds, bogofilter's spam_cutoff {BOGOFILTER_SPAM_CUTOFF}, "
             "SpamAssassin's required_score 5. 'Oracle' is recall at ham FPR <= 0.1 % with the threshold picked on "
             "the test set itself (a ranking measure, not reachable in service). Peers read every header, "
             "collection artefacts included; Floodgate's features leave those out. "
             "SpamAssassin is 4.0.1's stock rules plus Bayes trained on the split, without network tests, on 2002 "
             "mail: rules written for today's Received headers misfire on it (RDNS_NONE hits most ham), so its FPR "
             "here says little about it in service.", "",
             "| split | filter | ham FPR | spam recall | ROC AUC | (1-ROCA)% | oracle recall | CPU ms/msg |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for split_name, row in results.items():
        for name, m in row.items():
            if "scored" in m:
                name = f"{name} (sample of {m['scored']})"
            lines.append(f"| {split_name} | {name} | {100 * m['ham_fpr']:.2f}% ({m['confusion']['fp']}/{m['n_ham']}) | "
                         f"{100 * m['spam_recall']:.2f}% | {m['roc_auc']:.5f} | {m['one_minus_roca_pct']:.3f} | "
                         f"{100 * m['oracle_recall_at_fpr_0.001']:.2f}% | {m.get('cpu_ms_per_msg', '')} |")
    lines += ["", SECTION_END]
    return "\n".join(lines) + "\n"
