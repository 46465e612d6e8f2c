"""One line-length limit for every .py file of the project: 100 characters."""
import os
import subprocess

from helpers import REPO

LIMIT = 100
SKIP_DIRS = {".venv", ".git", "__pycache__", ".pytest_cache", "runs", "out",
             os.path.join("data", "cache")}


def python_files():
    """The git-tracked .py files; outside a git checkout, every .py below the repo but the ignored
    folders (.gitignore's)."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "*.py"], cwd=REPO, capture_output=True,
                             check=True).stdout.decode()
        files = [f for f in out.split("\0") if f]
        if files:
            return files
    except (OSError, subprocess.CalledProcessError):
        pass
    files = []
    for root, dirs, names in os.walk(REPO):
        rel = os.path.relpath(root, REPO)
        dirs[:] = [d for d in dirs if os.path.normpath(os.path.join(rel, d)) not in SKIP_DIRS]
        files += [os.path.normpath(os.path.join(rel, n)) for n in names if n.endswith(".py")]
    return files


def test_every_python_line_fits_in_100_columns():
    files = python_files()
    assert "mrpose.py" in files and os.path.join("tests", "test_style.py") in files
    long = []
    for f in files:
        with open(REPO / f, encoding="utf-8") as fh:
            long += [f"{f}:{n}: {len(line)} > {LIMIT}"
                     for n, line in enumerate(fh.read().splitlines(), 1) if len(line) > LIMIT]
    assert not long, f"{len(long)} lines over {LIMIT} characters:\n" + "\n".join(long)
