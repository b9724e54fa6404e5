"""Tests for arith_game.py: the expression parser and its bounds, hostile input, query parsing,
the Solver's final answer, the reward, difficulty, the problem sets and the CLI. Standard library
and pytest only; the whole file runs in a few seconds on a CPU."""

import builtins
import re
import string
import subprocess
import sys
from pathlib import Path

import pytest

import arith_game as game
from judge_prompts import CHALLENGER_PROMPT

HERE = Path(__file__).parent


def query(expression):
    return game.TEMPLATE.format(expression=expression)


def test_template_has_one_placeholder_and_fills_the_challenger_prompt():
    fields = [field for _, field, _, _ in string.Formatter().parse(game.TEMPLATE) if field is not None]
    assert fields == ["expression"]
    prompt = CHALLENGER_PROMPT.format(task=game.TASK, template=game.TEMPLATE)
    assert game.TEMPLATE in prompt and game.TASK in prompt


def test_the_tasks_examples_are_valid_problems_outside_the_held_out_and_dev_sets():
    examples = re.search(r"for example (.*)", game.TASK).group(1).replace(" or ", ", ").split(", ")
    kept_apart = {row["query"] for row in game.heldout_set() + game.dev_set()}
    assert len(examples) == 3 and all(game.true_answer(query(e)) is not None for e in examples)
    assert not kept_apart & {query(e) for e in examples}


@pytest.mark.parametrize("expression, value", [
    ("2 + 3 * 4", 14),              # * binds tighter
    ("2 * 3 + 4", 10),
    ("(2 + 3) * 4", 20),            # parentheses
    ("2 * (3 + (4 - 1))", 12),
    ("3 - 10", -7),                 # a negative result
    ("10 - 4 - 3", 3),              # left to right
    ("12-3*4", 0),                  # no spaces
    ("7", 7),
    ("0", 0),
    ("6 x 7", 42),                  # x and × as times
    ("6×7", 42),
    ("999999 * 999999", 999998000001),
])
def test_evaluate_well_formed(expression, value):
    assert game.evaluate(expression) == value


@pytest.mark.parametrize("expression", [
    "", "   ", "2 +", "+ 2", "* 3", "-3", "2 - -3", "(2 + 3", "2 + 3)", "(1))", "()", "2 ()", "2 (3)",
    "2 3", "2 ^ 3", "2 / 1", "1/0", "9**9**9", "2 ** 3", "two + three", "2 + y", "007", "1,000 + 1",
    "1.5 + 1", "2 + 3\n", "2\t+ 3", "{expression}", "²", "٣ + 1", None, 7,
    "__import__('os').system('ls')",
])
def test_evaluate_rejects(expression):
    assert game.evaluate(expression) is None


def test_bounds_each_reject_on_their_own():
    ok_depth = "(" * game.MAX_DEPTH + "1" + ")" * game.MAX_DEPTH
    assert game.evaluate(ok_depth) == 1
    assert game.evaluate("(" + ok_depth + ")") is None                              # depth
    assert game.evaluate("1" * game.MAX_DIGITS) == int("1" * game.MAX_DIGITS)
    assert game.evaluate("1" * (game.MAX_DIGITS + 1)) is None                      # digits
    assert game.evaluate(" + ".join(["1"] * (game.MAX_OPERATORS + 1))) == game.MAX_OPERATORS + 1
    assert game.evaluate(" + ".join(["1"] * (game.MAX_OPERATORS + 2))) is None      # operators
    assert game.evaluate("1" + " " * game.MAX_CHARS) is None                        # length
    # the value bound holds for every intermediate result, not only the final one
    assert game.evaluate("999999 * 999999 * 2") is None
    assert game.evaluate("999999 * 999999 * 2 - 999999 * 999999 * 2") is None
    assert game.evaluate("999999 * 999999 - 999999 * 999999") == 0


HOSTILE = [
    "__import__('os').system('ls')",
    "9**9**9",
    "1/0",
    "1 + " * 2500 + "1",                   # 10,000 characters
    "(" * 5000 + "1" + ")" * 5000,          # 5,000 nested parentheses
    "9" * 500,                              # a 500-digit literal
    " * ".join(["99999"] * 20),             # a product chain that would explode
    "(" * 5000,
]


@pytest.mark.parametrize("expression", HOSTILE)
def test_hostile_input_is_invalid(expression):
    assert game.evaluate(expression) is None
    assert game.parse_problem(query(expression)) is None
    assert game.true_answer(query(expression)) is None
    assert game.reward([query(expression)], ["0"]) == [None]
    assert game.difficulty(query(expression)) is None


def test_hostile_input_is_invalid_with_the_length_bound_lifted(monkeypatch):
    # each other bound stops its own attack even without the length bound: no RecursionError
    monkeypatch.setattr(game, "MAX_CHARS", 10 ** 6)
    for expression in HOSTILE:
        assert game.evaluate(expression) is None


def test_model_text_is_never_run_as_code(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("model text run as code")
    for name in ("eval", "exec", "compile"):
        monkeypatch.setattr(builtins, name, refuse)
    assert game.evaluate("2 + 3 * 4") == 14
    assert game.true_answer(query("__import__('os').system('ls')")) is None


@pytest.mark.parametrize("text, expression", [
    (query("12 + 7"), "12 + 7"),
    ("  " + query("12 + 7") + "\n", "12 + 7"),             # surrounding whitespace
    ("What is 12 + 7?", "12 + 7"),                          # no closing sentence
    ("what is  (1 + 2) * 3 ? answer with the number only", "(1 + 2) * 3"),
])
def test_parse_problem(text, expression):
    assert game.parse_problem(text) == expression


@pytest.mark.parametrize("text", [
    "",
    "What is ? Answer with the number only.",               # no expression
    query("{expression}"),                                  # the placeholder left in
    query("twelve plus seven"),                             # words instead of numbers
    query("12 +"),                                          # a trailing operator
    query("(12 + 7"),                                       # unbalanced parentheses
    query("12 + 7)"),
    query("12 + 7") + " 19",                                # the answer leaked into the query
    "What is 2 + 3? What is 4 + 5?",
    "What is 12 + 7",                                       # no question mark
    query("19"),                                            # no operation: it is its answer
    query("(19)"),
    "Tell me a joke.",
    None,
])
def test_parse_problem_rejects(text):
    assert game.parse_problem(text) is None
    assert game.true_answer(text) is None


def test_true_answer():
    assert game.true_answer(query("2 + 3 * 4")) == 14
    assert game.true_answer(" What is 3 - 10?") == -7


@pytest.mark.parametrize("text, value", [
    ("The answer is 42.", 42),
    ("12 + 30 = 42", 42),
    ("-7", -7),
    ("3 - 10 = -7.", -7),
    ("3 - 10 = −7", -7),          # a Unicode minus
    ("10-3", 3),                   # a minus after a digit is a subtraction
    ("1,234", 1234),
    ("The total is 1,234,567.", 1234567),
    ("**42**", 42),
    ("12.0", 12),                  # a whole number written with a decimal point
    ("12.5 rounds to 13", 13),
    ("no number here", None),
    ("", None),
    ("The answer is 12.5", None),  # the last number is not an integer
    ("9" * 5000, None),            # too long to be an answer; int() would refuse it
    (None, None),
])
def test_final_answer(text, value):
    assert game.final_answer(text) == value


def test_reward():
    good, bad = query("6 * 7"), query("6 * seven")
    assert game.reward([good, good, good, bad], ["42", "The answer is 42.", "41", "42"]) == [1.0, 1.0, 0.0, None]
    assert game.reward([], []) == []
    with pytest.raises(ValueError):
        game.reward([good, good], ["42"])


def test_difficulty():
    expected = {"1-digit sum": 2, "2-digit sum": 4, "1-digit product": 2, "2-digit product": 3, "3-digit sum": 6}
    assert set(expected) == set(game.LEVELS)
    for row in game.heldout_set(per_level=8):
        assert game.difficulty(row["query"]) == expected[row["level"]]
    assert game.difficulty(query("(1 + 23) * 456")) == 6
    assert game.difficulty(query("1 + ")) is None


def test_problems_are_deterministic_distinct_and_correct():
    rows = game.problems("2-digit sum", 50, seed=5)
    assert rows == game.problems("2-digit sum", 50, seed=5)
    assert rows != game.problems("2-digit sum", 50, seed=6)
    assert len({row["query"] for row in rows}) == 50
    for row in rows:
        assert row["level"] == "2-digit sum"
        assert row["query"] == query(game.parse_problem(row["query"]))
        assert row["answer"] == game.true_answer(row["query"]) is not None
        a, b = map(int, game.parse_problem(row["query"]).split(" + "))
        assert 10 <= a <= 99 and 10 <= b <= 99 and row["answer"] == a + b


def test_problems_exclude_and_run_out():
    first = game.problems("1-digit sum", 30, seed=0)
    rest = game.problems("1-digit sum", 70, seed=0, exclude=[row["query"] for row in first])
    assert {row["query"] for row in first}.isdisjoint(row["query"] for row in rest)
    with pytest.raises(ValueError):  # only 100 one-digit sums exist
        game.problems("1-digit sum", 101, seed=0)


def test_sets_are_fixed_and_disjoint():
    heldout = game.heldout_set()
    assert heldout == game.heldout_set()
    assert len(heldout) == 64 * len(game.LEVELS)
    assert all(sum(row["level"] == level for row in heldout) == 64 for level in game.LEVELS)
    heldout_queries = {row["query"] for row in heldout}
    dev = {row["query"] for row in game.dev_set()}
    assert len(heldout_queries) == len(heldout) and dev.isdisjoint(heldout_queries)
    for seed in (0, 1, game.HELDOUT_SEED, game.DEV_SEED):  # even a seed equal to theirs
        training = game.training_set(512, seed)
        queries = {row["query"] for row in training}
        assert len(training) == len(queries) == 512
        assert queries.isdisjoint(heldout_queries) and queries.isdisjoint(dev)
        assert {row["level"] for row in training} == set(game.LEVELS)
    assert game.training_set(100, 3) == game.training_set(100, 3)
    assert len(game.training_set(100, 3)) == 100  # 100 is no multiple of the mix's total
    with pytest.raises(ValueError):  # the 1-digit levels run out
        game.training_set(5000, 0)


def test_cli(tmp_path):
    out = tmp_path / "queries.txt"
    command = [sys.executable, str(HERE / "arith_game.py"), "queries", "--count", "64", "--seed", "3", "--out", str(out)]
    subprocess.run(command, check=True, capture_output=True, text=True)
    lines = out.read_text(encoding="utf-8").splitlines()
    assert lines == [row["query"] for row in game.training_set(64, 3)]
    assert all(game.true_answer(line) is not None for line in lines)
    heldout = subprocess.run([sys.executable, str(HERE / "arith_game.py"), "heldout"],
                             check=True, capture_output=True, text=True).stdout
    for level in game.LEVELS:
        assert level in heldout
    failed = subprocess.run(command[:4] + ["100000"] + command[5:], capture_output=True, text=True)
    assert failed.returncode != 0 and "unused" in failed.stderr
