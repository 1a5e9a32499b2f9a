"""README's Layout section and ARCHITECTURE.md name every package and module of authz_server/, and
nothing that is not there: a newcomer's map must match the tree."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
PACKAGE = ROOT / "authz_server"


def _layout() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Layout\n") :]
    return section[: section.index("```\n", section.index("```\n") + 4)]


def _packages() -> list[str]:
    return sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file())


def _modules(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("*.py") if p.name not in {"__init__.py", "__main__.py"})


@pytest.mark.parametrize("doc", ["README.md Layout", "ARCHITECTURE.md"])
def test_every_package_and_top_level_module_is_on_the_map(doc: str) -> None:
    text = _layout() if doc.startswith("README") else (ROOT / "ARCHITECTURE.md").read_text(encoding="utf-8")
    missing = [f"{name}/" for name in _packages() if f"{name}/" not in text]
    missing += [name for name in _modules(PACKAGE) if name not in text]
    assert not missing, f"{doc} does not mention {missing}"


def test_the_layout_lists_every_module_of_every_package() -> None:
    layout = _layout()
    missing = [f"{package}/{name}" for package in _packages() for name in _modules(PACKAGE / package)
               if name not in layout]  # fmt: skip
    assert not missing, f"README's Layout does not mention {missing}"


def test_the_layout_names_no_module_that_is_gone() -> None:
    named = set(re.findall(r"\b([a-z_]+\.py)\b", _layout()))
    existing = {p.name for p in PACKAGE.rglob("*.py")} | {p.name for p in ROOT.glob("*/*.py")}
    existing |= {p.name for p in (ROOT / "tests").rglob("*.py")}  # the tests/ line names test files
    assert not named - existing, f"README's Layout names {sorted(named - existing)}, which do not exist"
