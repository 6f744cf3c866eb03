"""README.md's "## Layout" block names every module of int_lm/ and no module that does not exist.

Read at test time from the tree and the README (no module list here): every int_lm/*.py except
__init__.py / __main__.py must have an entry ``name.py``, every subpackage an entry ``name/``; an
entry must name something that exists, and a ``*.py`` that a subpackage's entry mentions (on its
line or the more-indented lines under it) must exist in that subpackage.
"""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "int_lm"
SKIP = {"__init__.py", "__main__.py"}


def layout_entries(readme: str) -> dict[str, str]:
    """{entry name as written ("model.py", "data/"): its text, continuation lines included}."""
    section = readme.split("\n## Layout", 1)[1]
    block = section.split("```", 2)[1]
    lines = block.splitlines()
    start = lines.index("int_lm/") + 1
    entries: dict[str, str] = {}
    name = None
    for line in lines[start:]:
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip(" "))
        if indent == 0:          # the next top-level entry (configs/, docs/, ...) ends int_lm/
            break
        if indent == 2:
            name, _, text = line.strip().partition(" ")
            assert name not in entries, f"README layout names {name} twice"
            entries[name] = text.strip()
        else:                    # a continuation (or a nested entry) of the entry above
            assert name is not None, f"indented line before any entry: {line!r}"
            entries[name] += " " + line.strip()
    return entries


def package_modules() -> set[str]:
    """int_lm's modules and subpackages as the README writes them: "model.py", "data/"."""
    names = {p.name for p in PACKAGE.glob("*.py") if p.name not in SKIP}
    names |= {p.name + "/" for p in PACKAGE.iterdir()
              if p.is_dir() and p.name != "__pycache__" and any(p.glob("*.py"))}
    return names


def test_readme_layout_matches_the_package():
    entries = layout_entries((ROOT / "README.md").read_text(encoding="utf-8"))
    actual = package_modules()
    missing = sorted(actual - set(entries))
    stale = sorted(set(entries) - actual)
    assert not missing, f"README.md's Layout block does not name these modules of int_lm/: {missing}"
    assert not stale, f"README.md's Layout block names modules that int_lm/ no longer has: {stale}"
    for name, text in entries.items():
        if name.endswith("/"):
            sub = PACKAGE / name.rstrip("/")
            named = set(re.findall(r"\b\w+\.py\b", text))
            gone = sorted(m for m in named if not (sub / m).is_file())
            assert not gone, f"README.md's Layout entry {name} names modules it no longer has: {gone}"


def test_layout_parser_reads_entries_continuations_and_the_end_of_the_block():
    readme = "\n".join([
        "# x", "", "## Layout", "", "```", "int_lm/",
        "  model.py      the model", "  optim/        rules; base.py",
        "                (thresholds), sign.py", "configs/        toml", "```", "",
    ])
    assert layout_entries(readme) == {"model.py": "the model",
                                      "optim/": "rules; base.py (thresholds), sign.py"}
