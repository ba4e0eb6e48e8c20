"""docs/layout.md against the tree: every file a contributor meets is on the page, and every
path on the page is still there. Reads files only; loads no model."""

import glob
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYOUT = ROOT / "docs" / "layout.md"

# Every file under these folders must be on the page by its own path.
LISTED_FILE_BY_FILE = ("workbench", "scripts", "deploy")

# A bare name (no slash) in backticks is read as a path at the repository root when it looks
# like a file: `Makefile`, `app.py`, `.gitignore`.
FILE_NAME = re.compile(
    r"^(\.[\w.-]+|[\w.-]+\.(py|md|toml|yml|yaml|json|jsonl|txt|sh|ipynb|png|cfg|ini)|Makefile|Dockerfile)$"
)

HOW_TO_FIX = (
    "docs/layout.md lists every file under workbench/, scripts/ and deploy/ by its path, in "
    "backticks, on its floor (ground, models, inputs, features, session, faces and tools; imports "
    "point down, never up), with one line consistent with the module's docstring:\n"
    "    | `workbench/FLOOR/module.py` | what it is, from its docstring |\n"
    "and every path written there in backticks must exist. Add a row for each new file, remove or "
    "correct the row of each file that moved or went, then rerun "
    "`python -m pytest tests/test_layout.py`."
)


def repository_files() -> list[str]:
    """Paths (relative, with /) of the files in the working tree that git does not ignore:
    tracked ones still present, and new untracked ones (a module being added counts)."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=ROOT,
            capture_output=True,
            check=True,
            text=True,
        ).stdout
        paths = [p for p in out.split("\0") if p]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout (an unpacked sdist)
        paths = [
            p.relative_to(ROOT).as_posix()
            for top in LISTED_FILE_BY_FILE
            for p in (ROOT / top).rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
        ]
    return sorted({p for p in paths if (ROOT / p).is_file()})


def mentioned_paths() -> set[str]:
    """Every backticked token on the page that is a path: it has a slash (and no space, no
    URL scheme) or is a bare file name. Fenced code blocks (the floors diagram) do not count."""
    text = re.sub(r"^```.*?^```", "", LAYOUT.read_text(encoding="utf-8"), flags=re.S | re.M)
    paths = set()
    for token in re.findall(r"`([^`\n]+)`", text):
        token = token.strip()
        if re.search(r"\s", token) or "://" in token or re.search(r"[()=:|<>,\"']", token):
            continue
        if "/" in token or FILE_NAME.match(token):
            paths.add(token)
    return paths


def exists(path: str) -> bool:
    if any(c in path for c in "*?["):
        return bool(glob.glob(str(ROOT / path)))
    if path.endswith("/"):
        return (ROOT / path).is_dir()
    return (ROOT / path).exists()


def top_level_entries(files: list[str]) -> list[str]:
    """The repository's top-level folders (as `name/`) and files."""
    return sorted({f.split("/")[0] + "/" if "/" in f else f for f in files})


def test_layout_page_matches_the_tree():
    files = repository_files()
    mentioned = mentioned_paths()
    mentioned_tops = {m.split("/")[0] + "/" if "/" in m else m for m in mentioned}

    not_on_page = [f for f in files if f.split("/")[0] in LISTED_FILE_BY_FILE and f not in mentioned]
    not_on_page += [
        t for t in top_level_entries(files) if t not in mentioned_tops and t.rstrip("/") not in LISTED_FILE_BY_FILE
    ]
    gone = sorted(m for m in mentioned if not exists(m))

    problems = [f"in the tree, not on the page: {p}" for p in not_on_page]
    problems += [f"on the page, not in the tree: {p}" for p in gone]
    assert not problems, "docs/layout.md is out of date:\n  " + "\n  ".join(problems) + "\n\n" + HOW_TO_FIX


def test_layout_page_is_linked_from_the_readme():
    assert "(docs/layout.md)" in (ROOT / "README.md").read_text(encoding="utf-8")
