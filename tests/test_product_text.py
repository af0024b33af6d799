"""The repository speaks of the product only: no trace of the machines or the process it was built with.

Every file in the checkout (tracked, or new and not ignored) and every file name is searched for words that
belong to the build environment rather than to the product: GPU leases and their time limits, carried wheels,
the build machines' paths and data folders, calls of the build tools, issue numbers, and the project notes
that are not part of the repository. Hardware is named plainly ("one NVIDIA H100 80GB") and the method is
cited from docs/method.md and the paper.
"""

import os
import re
import subprocess

import pytest


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
THIS_FILE = "tests/test_product_text.py"  # it has to name the words it looks for

# (name, pattern): what must not come back
FORBIDDEN = (
    ("lease", re.compile(r"\blease", re.IGNORECASE)),  # not "release", "please"
    ("session", re.compile(r"\bsessions?\b", re.IGNORECASE)),
    ("issue number", re.compile(r"\bissues? #?\d+", re.IGNORECASE)),
    ("project notes", re.compile(r"METHOD\.md")),  # docs/method.md is the repository's own
    ("GPU data folder", re.compile(r"\.gpudata")),
    ("build machine path", re.compile(r"/work/|\.\./shared\b")),
    ("device call", re.compile(r"\btimeout_s\b|\bdevice tool\b|\bnvidia-h\d+-x\d+", re.IGNORECASE)),
    ("device output folder", re.compile(r"\bOUT=|\$OUT\b")),  # not `out=` of ordinary code
    ("carried wheels", re.compile(r"carried wheels?|wheels? (?:was |were )?carried|\.whl/", re.IGNORECASE)),
    ("development process", re.compile(r"\bworktree|\bthe lead\b|where this was developed|development machines?|"
                                       r"machines? (?:this project is|it was) developed|\b10-minute\b", re.IGNORECASE)),
)
# (name, text): a line holding this text may use that word, for what it is there
ALLOWED = (
    ("session", 'scope="session"'),  # pytest's fixture scope
)


def checkout_files():
    try:
        listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                                capture_output=True, text=True, check=True).stdout  # fmt: skip
    except (OSError, subprocess.CalledProcessError) as error:
        pytest.skip(f"not a git checkout ({error}): the files of the product cannot be listed")
    return sorted(p for p in set(listed.split("\0")) if p and p != THIS_FILE and os.path.isfile(os.path.join(ROOT, p)))


def hits_in(path, text):
    found = []
    for number, line in enumerate(text.splitlines(), start=1):
        for name, pattern in FORBIDDEN:
            if pattern.search(line) and not any(n == name and allowed in line for n, allowed in ALLOWED):
                found.append(f"{path}:{number}: {name}: {line.strip()[:160]}")
    return found


def test_the_finder_finds_what_it_should():
    for text in ("lease 3 ran", "this session's GPU time", "(issue 8)", "see METHOD.md", ".gpudata/photos",
                 "/work/main/examples", "../shared/data", "run(timeout_s=600)", "OUT=$OUT bash", "its wheel was carried",
                 "the device tool's machine", "nvidia-h100-x1", "where this was developed", "10-minute calls"):  # fmt: skip
        assert hits_in("x", text), text
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
