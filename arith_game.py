"""A verifiable arithmetic game for Language Self-Play.

The Challenger fills TEMPLATE with an arithmetic expression of its own choosing, for example
"What is 17 * 3? Answer with the number only."; the Solver answers it several times, and `reward`
gives each answer 1.0 when its last integer is the expression's value, else 0.0. A query that is
not a valid problem gets None, and the trainer penalises the Challenger for it.

Why arithmetic: the reward is exact and costs no judge model; the Challenger can make problems
harder by itself (more digits, more operators, parentheses), so its drift is easy to follow with
`difficulty`; and a 135M model is weak enough at it to leave room to improve.

Model text is never run as code: `evaluate` is a small tokenizer and recursive-descent parser with
bounds on length, operators, digits, nesting and the size of every intermediate value, so hostile
text makes an invalid query, never a crash, a hang or a huge number.

Data: `heldout_set()` is the fixed evaluation set; never use it to choose settings: use
`dev_set()` for that. `training_set()` is disjoint from both.

It is a game file for `python lsp.py --game arith_game.py`, which reads from it TASK, TEMPLATE,
`reward` and TRAINER_OPTIONS (the trainer's settings for the game), and, for the curriculum's
metrics and the live learning curve, `difficulty`, `canonical` and `dev_set`. `python eval.py
score --game arith_game.py` scores a model on `heldout_set`. A game of your own is a file with
the same names; only TASK, TEMPLATE and `reward` are required.

Run:
    python lsp.py --game arith_game.py --out runs/game                    # self-play, ~12 min
    python eval.py score --model runs/game/checkpoint-000025              # the held-out score
    python arith_game.py queries --count 512 --seed 0 --out queries.txt   # training queries
    python arith_game.py heldout                                          # the held-out set
"""

import argparse
import random
import re

# The examples help a small model write a problem at all; none is a held-out or dev problem.
TASK = "arithmetic with whole numbers, using +, - and *, for example 6 + 9, 23 * 3 or 58 - 19"
TEMPLATE = "What is {expression}? Answer with the number only."
# The trainer's settings for this game (python lsp.py --game arith_game.py): SmolLM2 on a CPU,
# 4 problems a step, 8 answers each, and the edge reward for the Challenger (deviation 9). The
# sampling and learning-rate settings were chosen on Solver-only runs; see docs/runs.md.
TRAINER_OPTIONS = {
    "model": "smollm2", "challenger_reward": "edge", "num_queries": 4, "num_generations": 8,
    "max_query_tokens": 24, "max_completion_length": 32, "micro_batch_size": 8,
    "temperature": 0.7, "learning_rate": 1e-5, "steps": 25, "eval_every": 5, "log_every": 5,
    "save_every": 25,  # a checkpoint of SmolLM2 and its AdamW states takes 1.6 GB
}

# Bounds on one expression: generous for any problem a small model can be asked, tight enough
# that checking hostile text takes a few hundred steps and every value has at most 13 digits.
MAX_CHARS = 200       # characters in the expression
MAX_OPERATORS = 20    # +, - and * together
MAX_DIGITS = 6        # digits in one literal
MAX_DEPTH = 10        # nesting of parentheses; keeps the recursion far from Python's limit
MAX_VALUE = 10 ** 12  # bound on |value| of every intermediate result
DIGITS = "0123456789"  # not str.isdigit, which also accepts "²" and other scripts' digits
# Small models often write 'x' or '×' for times, and the Solver reads them the same way, so a
# problem written with them is a fair problem. Division is left out: its results need not be whole.
TIMES = "*x×"
PIECE = re.compile(r"[0-9]+| +|.", re.DOTALL)  # a literal, a run of spaces or any one character

# "What is <expression>?" with the closing sentence optional; case and spacing may vary.
QUERY = re.compile(r"what\s+is\s+([^?]*)\?"
                   r"(?:\s*answer\s+with\s+the\s+number\s+only\.?)?", re.IGNORECASE)
# A number in the Solver's text: an optional sign (a minus after a letter, digit or ')' is a
# subtraction, not a sign), digits with optional thousands separators, an optional decimal part.
NUMBER = re.compile(r"(?:(?<![\w)])([-−]))?"  # the sign
                    r"([0-9]{1,3}(?:,[0-9]{3})+(?![0-9])|[0-9]+)"  # the whole part
                    r"(?:\.([0-9]+))?")  # the decimal part


def tokenize(expression):
    """Integer literals and the operators '+', '-', '*', '(' and ')' of an expression, or None."""
    if not isinstance(expression, str) or len(expression) > MAX_CHARS:
        return None
    tokens = []
    for piece in PIECE.findall(expression):
        if piece[0] in DIGITS:
            # a leading zero ("007") is rejected: every number has one spelling only
            if len(piece) > MAX_DIGITS or (piece[0] == "0" and len(piece) > 1):
                return None
            tokens.append(int(piece))
        elif piece in TIMES or piece in ("+", "-", "(", ")"):
            tokens.append("*" if piece in TIMES else piece)
        elif piece[0] != " ":
            return None  # letters, '/', '^', '.', ',', quotes, newlines...
    if sum(token in ("+", "-", "*") for token in tokens) > MAX_OPERATORS:
        return None
    return tokens


class Invalid(Exception):
    """Raised inside the parser; `evaluate` turns it into None."""


# The grammar, one function a rule; precedence comes from it (* binds tighter than + and -):
#     sum := product (('+' | '-') product)*    product := factor ('*' factor)*
#     factor := literal | '(' sum ')'
# There is no unary minus: literals are non-negative and negative values come only from
# subtraction, which keeps the grammar small and rules out '-3', '2 - -3' and '- - - 3'.
# `tokens` is reversed, so tokens[-1] is the next token and tokens.pop() takes it.
def parse_sum(tokens, depth):
    value = parse_product(tokens, depth)
    while tokens and tokens[-1] in ("+", "-"):
        operator, right = tokens.pop(), parse_product(tokens, depth)
        value = bounded(value + right if operator == "+" else value - right)
    return value


def parse_product(tokens, depth):
    value = parse_factor(tokens, depth)
    while tokens and tokens[-1] == "*":
        tokens.pop()
        value = bounded(value * parse_factor(tokens, depth))
    return value


def parse_factor(tokens, depth):
    token = tokens.pop() if tokens else None
    if isinstance(token, int):
        return token
    if token == "(" and depth < MAX_DEPTH:
        value = parse_sum(tokens, depth + 1)
        if not tokens or tokens.pop() != ")":
            raise Invalid
        return value
    raise Invalid  # an operator, ')', '(' too deep, or the end: '2 +', '()', '-3'


def bounded(value):
    if abs(value) > MAX_VALUE:
        raise Invalid
    return value


def evaluate(expression):
    """The integer value of an expression of non-negative integers, + - * (x, ×) and parentheses,
    or None if it is anything else or breaks a bound. Never runs the text as code."""
    tokens = tokenize(expression)
    if not tokens:
        return None
    tokens.reverse()
    try:
        value = parse_sum(tokens, 0)
    except Invalid:
        return None
    return None if tokens else value  # leftovers: '2 3', '(1))'


def parse_problem(query):
    """The expression of a query that follows TEMPLATE and is valid, else None. It must hold an
    operation: "What is 19?" states its own answer, a problem any Solver solves by copying."""
    if not isinstance(query, str):
        return None
    query = query.strip()
    if len(query) > len(TEMPLATE) + MAX_CHARS:
        return None
    match = QUERY.fullmatch(query)
    expression = match.group(1).strip() if match else None
    if evaluate(expression) is None or not any(op in tokenize(expression) for op in "+-*"):
        return None
    return expression


def true_answer(query):
    return evaluate(parse_problem(query))


def final_answer(text):
    """The last number in the Solver's text if it is an integer ("-7", "1,234", "12.0"), else None
    ("no number", or a last number like "12.5" that is not whole and so cannot be right)."""
    numbers = NUMBER.findall(text) if isinstance(text, str) else []
    if not numbers:
        return None
    sign, whole, fraction = numbers[-1]
    whole = whole.replace(",", "")
    # a 20-digit number cannot be a true answer, and int() refuses more than 4300 digits
    if (fraction and fraction.strip("0")) or len(whole) > 20:
        return None
    return -int(whole) if sign else int(whole)


def reward(queries, answers):
    """1.0 or 0.0 per (query, answer) pair; None where the query is not a valid problem."""
    if len(queries) != len(answers):
        raise ValueError(f"{len(queries)} queries but {len(answers)} answers")
    truth = {query: true_answer(query) for query in set(queries)}  # each query comes G times
    return [None if truth[q] is None else float(final_answer(a) == truth[q])
            for q, a in zip(queries, answers)]


def difficulty(query):
    """Total digits of the operands: 2 for '3 + 4', 4 for '12 + 34', 6 for '123 + 456'.

    Products count like sums of the same digits, and operators and parentheses add nothing.
    None if the query is not a valid problem.
    """
    expression = parse_problem(query)
    if expression is None:
        return None
    return sum(len(str(token)) for token in tokenize(expression) if isinstance(token, int))


def canonical(query):
    """The problem a query states, spelled one way ('6+9' for 'What is 6 + 9?'), or None if it is
    not a valid problem. The trainer counts repeated problems with it; '9 + 6' is another
    problem, which the Solver reads in another order."""
    expression = parse_problem(query)
    return None if expression is None else "".join(map(str, tokenize(expression)))


def number(rng, digits):
    """A random number with this many digits (0 to 9 for one digit)."""
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10 ** digits - 1)


# Levels roughly from easy to hard for a small model. Each 1-digit level has only 100 problems.
LEVELS = {
    "1-digit sum": lambda rng: f"{number(rng, 1)} + {number(rng, 1)}",
    "2-digit sum": lambda rng: f"{number(rng, 2)} + {number(rng, 2)}",
    "1-digit product": lambda rng: f"{number(rng, 1)} * {number(rng, 1)}",
    # not the trivial * 0 and * 1
    "2-digit product": lambda rng: f"{number(rng, 2)} * {rng.randint(2, 9)}",
    "3-digit sum": lambda rng: f"{number(rng, 3)} + {number(rng, 3)}",
}
HELDOUT_SEED, DEV_SEED = 1234, 4321
# Training queries per level, out of 32. The 1-digit levels are rare because held-out and dev
# take 80 of their 100 problems; past about 640 queries they run out (ValueError).
TRAINING_MIX = {"1-digit sum": 1, "2-digit sum": 10, "1-digit product": 1,
                "2-digit product": 10, "3-digit sum": 10}


def problems(level, count, seed, exclude=()):
    """`count` distinct problems of a level as {"level", "query", "answer"}, the same for a seed,
    none of them in `exclude`. Queries are written by filling TEMPLATE, as the Challenger does."""
    rng = random.Random(f"{level}/{seed}")
    excluded, chosen, misses = set(exclude), {}, 0
    # a small level can run out of unused problems: give up after many draws in a row find none
    while len(chosen) < count and misses < 10_000:
        query = TEMPLATE.format(expression=LEVELS[level](rng))
        if query in excluded or query in chosen:
            misses += 1
        else:
            chosen[query] = true_answer(query)
            misses = 0
    if len(chosen) < count:
        raise ValueError(f"found only {len(chosen)} unused {level!r} problems, {count} asked for")
    return [{"level": level, "query": query, "answer": answer} for query, answer in chosen.items()]


def heldout_set(per_level=64):
    """The fixed held-out set, for final evaluation only: never choose settings with it."""
    return [row for level in LEVELS for row in problems(level, per_level, HELDOUT_SEED)]


def dev_set(per_level=16):
    """The set for choosing settings; disjoint from the held-out set."""
    heldout = {row["query"] for row in heldout_set()}
    return [row for level in LEVELS
            for row in problems(level, per_level, DEV_SEED, exclude=heldout)]


def training_set(count, seed):
    """`count` shuffled training problems drawn by TRAINING_MIX, disjoint from held-out and dev."""
    exclude = {row["query"] for row in heldout_set() + dev_set()}
    total = sum(TRAINING_MIX.values())
    counts = {level: count * weight // total for level, weight in TRAINING_MIX.items()}
    counts["3-digit sum"] += count - sum(counts.values())  # the rounding remainder: a large level
    rows = [row for level, n in counts.items() for row in problems(level, n, seed, exclude)]
    random.Random(seed).shuffle(rows)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description="The arithmetic game's problem sets.")
    commands = parser.add_subparsers(dest="command", required=True)
    queries = commands.add_parser("queries", help="write training queries, one a line")
    queries.add_argument("--count", type=int, default=512)
    queries.add_argument("--seed", type=int, default=0)
    queries.add_argument("--out", required=True, help="file to write")
    commands.add_parser("heldout", help="print the held-out set's levels and examples")
    args = parser.parse_args(argv)
    if args.command == "queries":
        try:
            rows = training_set(args.count, args.seed)
        except ValueError as error:
            parser.error(str(error))
        with open(args.out, "w", encoding="utf-8") as file:
            file.writelines(row["query"] + "\n" for row in rows)
        print(f"wrote {len(rows)} queries to {args.out}")
    else:
        rows = heldout_set()
        print(f"held-out set: {len(rows)} problems, seed {HELDOUT_SEED}")
        for level in LEVELS:
            at_level = [row for row in rows if row["level"] == level]
            example = at_level[0]
            print(f"  {level:16} {len(at_level):3} problems, "
                  f"difficulty {difficulty(example['query'])}, "
                  f"e.g. {example['query']!r} -> {example['answer']}")


if __name__ == "__main__":
    main()
