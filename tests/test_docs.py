"""The docs: README stays a short front door with CI's test command, the generated pages
(configuration reference, benchmarks index) are what their generator writes today, every
results file the docs name exists, and the MkDocs site builds with no broken link."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _gen_pages():
    spec = importlib.util.spec_from_file_location("gen_pages", DOCS / "gen_pages.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _written_pages() -> list[Path]:
    """The hand-written pages (docs/devices.md included), not the generated ones."""
    generated = {DOCS / "reference" / "configuration.md", *(DOCS / "benchmarks").glob("*.md")}
    return [p for p in DOCS.rglob("*.md") if p not in generated]


def test_readme_is_short_and_holds_ci_test_command():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 300, "README is the front door: move detail to docs/"
    ci = (ROOT / ".ci" / "run").read_text()
    command = "python3 -m pytest -q"
    assert re.search(rf"^{re.escape(command)}$", ci, re.M), ".ci/run no longer runs it"
    assert re.search(rf"^{re.escape(command)}$", readme, re.M), \
        "README must show the test command that CI runs"
    assert "mkdocs build --strict" in ci
    for link in re.findall(r"\]\(((?:docs|benchmarks)/[^)#\s]+)", readme):
        assert (ROOT / link).exists(), f"README links a missing file: {link}"


def test_generated_pages_are_up_to_date():
    """`python docs/gen_pages.py` writes exactly the committed pages (and no stale extras)."""
    stale = _gen_pages().stale()
    assert not stale, f"stale generated pages {stale}: run `python docs/gen_pages.py`"


def test_benchmarks_index_covers_every_result():
    gen = _gen_pages()
    pages = gen.benchmark_pages()
    index = pages[gen.BENCH_DIR / "index.md"]
    for result in sorted(gen.RESULTS.rglob("*.json")):
        rel = result.relative_to(gen.RESULTS).as_posix()
        assert f"(../../benchmarks/results/{rel})" in index, f"index does not link {rel}"
    for table in sorted(gen.RESULTS.rglob("*.md")):
        page = pages[gen.BENCH_DIR / f"{gen._slug(table)}.md"]
        assert table.read_text().strip().splitlines()[-1] in page, f"{table} not embedded"


def test_configuration_page_is_every_declared_key():
    """The reference's tables are `edge-lam config --markdown`, pipes escaped for tables."""
    from edge_lam.cli.main import config_markdown, config_rows

    gen = _gen_pages()
    page = (DOCS / "reference" / "configuration.md").read_text()
    assert gen.config_block(page) == config_markdown().strip()
    for _, rows in config_rows():
        for key, _, _ in rows:
            assert f"| `{key}` |" in page, key


def test_results_files_named_in_docs_exist():
    """Every `benchmarks/results/...` path a page or README names is there."""
    named = re.compile(r"benchmarks/results/([\w./-]+\w)")
    for page in [*_written_pages(), ROOT / "README.md"]:
        for rel in named.findall(page.read_text()):
            if "{" in rel:
                continue
            assert (ROOT / "benchmarks" / "results" / rel).exists(), f"{page.name}: {rel}"


def test_every_written_page_is_in_the_nav():
    nav = (ROOT / "mkdocs.yml").read_text()
    for page in _written_pages():
        rel = page.relative_to(DOCS).as_posix()
        assert re.search(rf":\s+{re.escape(rel)}\s*$", nav, re.M), f"{rel} is not in mkdocs.yml"


def test_mkdocs_strict_build(tmp_path):
    """A broken link, a missing page or a bad nav entry fails the build (no network used)."""
    pytest.importorskip("mkdocs")
    pytest.importorskip("material")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir",
                           str(tmp_path / "site")], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
                          timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert (tmp_path / "site" / "index.html").exists()
    assert (tmp_path / "site" / "repo" / "benchmarks" / "results" / "fleet" / "fleet.json").exists()
