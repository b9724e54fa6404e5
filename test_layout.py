"""Tests of the project's shape, which keeps it readable: line width and one statement a line in
every product file, lsp.py's size, imports that run one way, a paper-to-code map that names only
code that exists, one list of deviations, and a README that is a short guide linking every docs
page. They read files; nothing is trained."""

import ast
import importlib
import re
from pathlib import Path

import pytest

HERE = Path(__file__).parent
SUPPORT_FILES = sorted(str(path.relative_to(HERE)) for path in (HERE / "machinery").glob("*.py"))
PRODUCT_FILES = ["lsp.py", "judge_prompts.py", "eval.py", "seeds.py", "bench.py", "bench_trl.py", "spin.py",
                 "arith_game.py", *SUPPORT_FILES]
PROJECT_MODULES = {Path(name).stem for name in PRODUCT_FILES if "/" not in name} | {"machinery", "conftest"}
COMMIT_HASH = re.compile(r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}\b")


def imported_modules(path):
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("name", PRODUCT_FILES)
def test_product_files_keep_a_readers_width_and_one_statement_a_line(name):
    text = (HERE / name).read_text()
    long_lines = [number for number, line in enumerate(text.splitlines(), 1) if len(line) > 100]
    assert not long_lines, f"{name}: lines over 100 characters: {long_lines}"
    starts = [node.lineno for node in ast.walk(ast.parse(text)) if isinstance(node, ast.stmt)]
    shared = sorted({line for line in starts if starts.count(line) > 1})
    assert not shared, f"{name}: lines holding two statements: {shared}"


def test_the_width_check_catches_what_it_should(tmp_path):
    dense = "if x: y = 1\na = 1; b = 2\nz = 3\n"
    starts = [node.lineno for node in ast.walk(ast.parse(dense)) if isinstance(node, ast.stmt)]
    assert sorted({line for line in starts if starts.count(line) > 1}) == [1, 2]


def test_lsp_is_the_algorithm_first_in_at_most_800_lines():
    text = (HERE / "lsp.py").read_text()
    assert len(text.splitlines()) <= 800
    functions = [node for node in ast.walk(ast.parse(text)) if isinstance(node, ast.FunctionDef)]
    long = [f.name for f in functions if f.end_lineno - f.lineno + 1 > 40]
    assert len(long) <= 2, f"functions over 40 lines: {long}"
    first_rl = next(f.lineno for f in functions if f.name == "lsp_advantages")
    assert first_rl < 350 and all(f.lineno < first_rl for f in functions if f.name == "challenger_values")


def test_support_modules_are_small_and_say_what_they_hold():
    assert SUPPORT_FILES and "machinery/__init__.py" in SUPPORT_FILES
    for name in SUPPORT_FILES:
        text = (HERE / name).read_text()
        assert len(text.splitlines()) <= 400, name
        assert ast.get_docstring(ast.parse(text)), f"{name} has no opening comment"


def test_imports_run_one_way():
    assert imported_modules(HERE / "lsp.py") & PROJECT_MODULES == {"judge_prompts", "machinery"}
    for name in SUPPORT_FILES:  # the support code imports nothing of the project but itself
        assert imported_modules(HERE / name) & PROJECT_MODULES <= {"machinery"}, name
    for name in PRODUCT_FILES:  # no product file imports a test file
        imported = imported_modules(HERE / name)
        assert "conftest" not in imported and not any(m.startswith("test_") for m in imported)


def table_after(heading, text):
    """The rows of the first markdown table after a heading, as lists of cells."""
    section = text.split(heading, 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[2:]]


def resolve(name):
    """The object a name in the docs stands for: `module.attr...` (a support module by its own name,
    `forward.pad`), or an attribute of lsp."""
    first, *rest = name.split(".")
    if f"{first}.py" in PRODUCT_FILES:
        target, parts = importlib.import_module(first), rest
    elif f"machinery/{first}.py" in SUPPORT_FILES:
        target, parts = importlib.import_module(f"machinery.{first}"), rest
    else:
        target, parts = importlib.import_module("lsp"), [first, *rest]
    for part in parts:
        target = getattr(target, part)
    return target


def test_the_paper_to_code_map_names_only_code_that_exists():
    rows = table_after("## From the paper to the code", (HERE / "docs/method.md").read_text())
    names = [name for _, code in rows for name in re.findall(r"`([^`]+)`", code)]
    assert len(rows) >= 10 and len(names) >= 20
    missing = []
    for name in names:
        try:
            resolve(name)
        except (AttributeError, ImportError):
            missing.append(name)
    assert not missing, f"the map names code that does not exist: {missing}"


def test_the_map_check_fails_on_a_stale_name():
    with pytest.raises(AttributeError):
        resolve("challenger_text")
    with pytest.raises(AttributeError):
        resolve("run_machinery.score_with_function")
    assert resolve("SelfPlay.iteration") and resolve("inputs.chat_prompt")


def test_lsp_and_the_docs_number_the_same_deviations():
    docstring = ast.get_docstring(ast.parse((HERE / "lsp.py").read_text()))
    listed = docstring.split("Deviations from the paper", 1)[1].split("\n\n", 1)[0]
    in_code = dict(re.findall(r"^ {4}(\d+)\. ([^:]+):", listed, re.MULTILINE))
    page = (HERE / "docs/method.md").read_text().split("## Deviations", 1)[1].split("\n## ")[0]
    in_docs = dict(re.findall(r"^(\d+)\. \*\*(.+?)\*\*", page, re.MULTILINE))
    assert list(in_code) == [str(n) for n in range(1, len(in_code) + 1)]
    assert list(in_docs) == list(in_code)
    for number, title in in_code.items():
        assert in_docs[number].replace("`", "").startswith(title), (number, title)


def test_the_readme_is_a_short_guide_that_links_every_docs_page():
    readme = (HERE / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    for page in sorted((HERE / "docs").glob("*.md")):
        assert f"(docs/{page.name}" in readme, f"README.md does not link docs/{page.name}"
    for path in [HERE / "README.md", *sorted((HERE / "docs").glob("*.md"))]:
        assert not COMMIT_HASH.findall(path.read_text()), f"{path.name} names a commit"


def test_ci_runs_the_readmes_test_command():
    readme = (HERE / "README.md").read_text()
    command = re.search(r"^python -m pytest -q (.+)$", readme, re.MULTILINE).group(1)
    ci = (HERE / ".ci/run").read_text()
    assert f"python -m pytest -q {command}" in ci
    tests = sorted(path.name for path in HERE.glob("test_*.py"))
    assert sorted(command.split()) == tests
