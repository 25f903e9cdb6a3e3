"""The docs a newcomer reads: README.md stays a short guide that links every doc, no link points
nowhere, and no commit hash sits in README.md or in a code comment (measured history belongs in
BENCHMARKS.md, commit hashes in the commit log)."""

from __future__ import annotations

import io
import re
import tokenize
from pathlib import Path
from urllib.parse import unquote

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
MAX_README_LINES = 300
# Linked from the README before it exists here: written on another branch (how to change a
# network). Remove the entry once that branch is merged.
CODE_PACKAGES = ("ml", "dags", "plugins")

# [text](target) and <img src="target">; a target in angle brackets may hold spaces.
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~)")
# 7-40 hex characters with at least one digit and one letter, as a word of its own ...
HEX_WORD = r"(?=[0-9a-f]*[0-9])(?=[0-9a-f]*[a-f])[0-9a-f]{7,40}"
HEX = re.compile(rf"(?<![0-9A-Za-z_./#-]){HEX_WORD}(?![0-9A-Za-z_-])")
# ... or, in README.md, also inside a name (`bench/results/<date>-<commit>.json`).
HEX_ANYWHERE = re.compile(rf"(?<![0-9A-Za-z]){HEX_WORD}(?![0-9A-Za-z])")
# In a code comment a hex word counts as a commit hash when it is quoted as code, in parentheses,
# or on a line that names a commit; a fingerprint or a colour elsewhere is not flagged.
HASH_CONTEXT = re.compile(
    r"\b(?:commit|commits|committed|rev|revision|sha|at|hash|code of|report)\b", re.I
)


def docs() -> list[Path]:
    return sorted((REPO / "docs").glob("*.md"))


def prose(text: str) -> str:
    """The text outside fenced code blocks (a shell line may look like a link)."""
    out, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line.strip()):
            fenced = not fenced
            continue
        out.append("" if fenced else line)
    return "\n".join(out)


def relative_links(path: Path) -> list[str]:
    targets = []
    for target in LINK.findall(prose(path.read_text())):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
            continue  # a URL (http:, mailto:) or an anchor on the same page
        targets.append(unquote(target.split("#", 1)[0]))
    return targets


def resolved(path: Path, target: str) -> str:
    return (path.parent / target).resolve().relative_to(REPO).as_posix()


def hashes(text: str, strict: bool = False) -> list[str]:
    """Hex words that look like commit hashes in `text`. `strict` (README.md, prose a person
    reads): every such word. Otherwise (code comments): those quoted as code or in parentheses,
    or on a line that names a commit."""
    found = []
    for line in text.splitlines():
        for match in (HEX_ANYWHERE if strict else HEX).finditer(line):
            word = match.group(0)
            quoted = re.search(rf"[`(]{word}|{word}[`)]", line)
            if strict or quoted or HASH_CONTEXT.search(line.replace(word, " ")):
                found.append(word)
    return found


def comments(path: Path) -> str:
    """A Python file's comments and docstrings (string statements), one per line, not its code."""
    source = path.read_text()
    parts: list[str] = []
    previous = tokenize.NEWLINE
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            parts.append(tok.string)
        elif tok.type == tokenize.STRING and previous in (
            tokenize.NEWLINE,
            tokenize.NL,
            tokenize.INDENT,
            tokenize.DEDENT,
        ):
            parts.append(tok.string)  # a string standing as a statement: a docstring
        if tok.type not in (tokenize.COMMENT, tokenize.NL):
            previous = tok.type
    return "\n".join(parts)


def test_readme_is_a_short_guide() -> None:
    lines = len(README.read_text().splitlines())
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines (at most {MAX_README_LINES})"


def test_readme_links_every_doc() -> None:
    linked = {resolved(README, t) for t in relative_links(README)}
    wanted = {p.relative_to(REPO).as_posix() for p in docs()} | {"BENCHMARKS.md", "REALDATA.md"}
    assert not wanted - linked, f"not linked from README.md: {sorted(wanted - linked)}"


@pytest.mark.parametrize("path", [README, *docs()], ids=lambda p: p.relative_to(REPO).as_posix())
def test_relative_links_point_to_files(path: Path) -> None:
    missing = [t for t in relative_links(path) if not (path.parent / t).exists()]
    assert not missing, f"{path.relative_to(REPO)} links to missing files: {missing}"


def test_no_commit_hash_in_the_readme() -> None:
    found = hashes(README.read_text(), strict=True)
    assert not found, f"commit hashes in README.md: {found} (they belong in BENCHMARKS.md)"


def test_no_commit_hash_in_code_comments() -> None:
    found = {}
    for package in CODE_PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            if words := hashes(comments(path)):
                found[path.relative_to(REPO).as_posix()] = words
    assert not found, f"commit hashes in code comments: {found}"


@pytest.mark.parametrize(
    ("text", "flagged"),
    [
        ("measured at commit 73b50eb", ["73b50eb"]),
        ("the code of `4008c01`", ["4008c01"]),
        ("the previous report (4008c01, with this bench folder)", ["4008c01"]),
        ("raw figures at 60b1cd7, 03:29 UTC", ["60b1cd7"]),
        ("dates such as 20240628 are refused", []),  # digits only: a date
        ("the data fingerprint deadbeefcafe", []),  # letters only
        ("fingerprint 3f2a9c1d0b of the bars", []),  # no commit context
        ("the colour #1f77b4c in a chart", []),  # a colour, not a word of its own
        ("results/2026-12-07-2059-6ece6bb.json", []),  # inside a name: README only
    ],
)
def test_the_hash_check_flags_only_hashes(text: str, flagged: list[str]) -> None:
    assert hashes(text) == flagged


def test_the_readme_check_flags_hashes_inside_names() -> None:
    assert hashes("raw figures in `bench/results/2026-12-07-2059-6ece6bb.json`", strict=True) == [
        "6ece6bb"
    ]
    assert hashes("dates such as 20240628; 1e308 is refused", strict=True) == []


def test_comments_reads_comments_and_docstrings_not_code(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text(
        '"""Doc 1a2b3c4d."""\nX = "not a comment a1b2c3d"  # note\n\n\ndef f():\n    """Inner."""\n'
    )
    text = comments(module)
    assert "Doc 1a2b3c4d." in text and "# note" in text and "Inner." in text
    assert "not a comment" not in text
