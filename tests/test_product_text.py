"""The repository speaks of the product only.

Every file in the checkout (tracked, or new and not ignored) and every file name is searched for notes about the
machines and the process a change was made with, which an outside user can neither run nor use: rented-machine
terms and time limits, private paths and scratch folders, calls of internal tools, tracker numbers, and notes kept
outside the repository. Hardware is named plainly ("one NVIDIA H100 80GB") and the method is cited from
docs/method.md and the paper. The patterns are written with character classes so that this file does not itself
spell the words it looks for.
"""

import os
import re
import subprocess

import pytest


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (name, pattern): what must not come back
FORBIDDEN = (
    ("machine rental", re.compile(r"\bl[e]ase", re.IGNORECASE)),  # not "release", "please"
    ("work period", re.compile(r"\bs[e]ssions?\b", re.IGNORECASE)),
    ("tracker number", re.compile(r"\bi[s]sues? #?\d+", re.IGNORECASE)),
    ("outside notes", re.compile(r"M[E]THOD\.md")),  # docs/method.md is the repository's own
    ("scratch data folder", re.compile(r"\.gp[u]data")),
    ("private path", re.compile(r"/w[o]rk/|\.\./sh[a]red\b")),
    ("internal tool call", re.compile(r"\btimeout[_]s\b|\bdev[i]ce tool\b|\bnvidia-h\d+-[x]\d+", re.IGNORECASE)),
    ("internal output folder", re.compile(r"\bO[U]T=|\$O[U]T\b")),  # not `out=` of ordinary code
    ("hand-carried packages", re.compile(r"c[a]rried wheels?|wheels? (?:was |were )?c[a]rried|\.w[h]l/", re.IGNORECASE)),
    ("development process", re.compile(r"\bw[o]rktree|\bthe l[e]ad\b|where this was d[e]veloped|d[e]velopment machines?|"
                                       r"machines? (?:this project is|it was) d[e]veloped|\b10-m[i]nute\b", re.IGNORECASE)),
)
# (name, text): a line holding this text may use that word, for what it is there
ALLOWED = (
    ("work period", 'scope="session"'),  # pytest's fixture scope
)


def checkout_files():
    try:
        listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                                capture_output=True, text=True, check=True).stdout  # fmt: skip
    except (OSError, subprocess.CalledProcessError) as error:
        pytest.skip(f"not a git checkout ({error}): the files of the product cannot be listed")
    return sorted(p for p in set(listed.split("\0")) if p and os.path.isfile(os.path.join(ROOT, p)))


def hits_in(path, text):
    found = []
    for number, line in enumerate(text.splitlines(), start=1):
        for name, pattern in FORBIDDEN:
            if pattern.search(line) and not any(n == name and allowed in line for n, allowed in ALLOWED):
                found.append(f"{path}:{number}: {name}: {line.strip()[:160]}")
    return found


def test_the_finder_finds_what_it_should():
    # each example is assembled from two pieces, so that this file does not spell them either
    for head, tail in (("l", "ease 3 ran"), ("this ses", "sion's GPU time"), ("(iss", "ue 8)"), ("see MET", "HOD.md"),
                       (".gpu", "data/photos"), ("/wo", "rk/main/examples"), ("../sh", "ared/data"),
                       ("run(timeout", "_s=600)"), ("O", "UT=1 bash"), ("its wheel was car", "ried"),
                       ("the dev", "ice tool's machine"), ("nvidia-h100", "-x1"), ("where this was dev", "eloped"),
                       ("10-min", "ute calls")):  # fmt: skip
        assert hits_in("x", head + tail), head + tail
    for text in ("a release of diffusers", "please note", "docs/method.md", "STDOUT=1", "out=folder", "one NVIDIA H100 80GB",
                 '@pytest.fixture(scope="session")', "subprocess.Popen(..., start_new_session=True)", "issues/281"):  # fmt: skip
        assert not hits_in("x", text), text


def test_no_file_speaks_of_the_build_environment():
    hits = []
    for path in checkout_files():
        hits += hits_in("(file name)", path)
        with open(os.path.join(ROOT, path), "rb") as f:
            data = f.read()
        if b"\0" in data:  # binary (figures, weights)
            continue
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        hits += hits_in(path, text)
    assert not hits, f"{len(hits)} line(s) speak of the build environment, not the product:\n" + "\n".join(hits)
