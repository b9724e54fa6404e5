"""Prompts for Language Self-Play, written in our own words after the structure in the paper.

CHALLENGER_PROMPT  makes the model write one instruction (the Challenger role).
QUALITY_PROMPT     the additive 7-point self-reward R_Q, judged by the frozen reference model.
REWARD_PROMPT      the task reward R when `--reward-model self` replaces a reward model.
PAIRWISE_PROMPT    for evaluation (eval.py): which of two responses to one instruction is better.
EVAL_INSTRUCTIONS  eval.py's built-in instructions, written for this project (never trained on).

The 7-point prompts end with the score inside <Score></Score>; `lsp.parse_score` reads it. The
pairwise prompt ends with [[A]], [[B]] or [[tie]]; `eval.parse_verdict` reads it.
Fill them with `str.format`: substituted text is not parsed again, so braces in a query or an
answer are safe.
"""

CHALLENGER_PROMPT = """You are writing test inputs for another AI assistant.

Background: a language task is a pair of an input and an output. The assistant only sees the \
input and has to produce the output.

Your job: write exactly ONE input for this task: {task}.
The input can be easy, medium or hard, or even deliberately noisy. Aim to stress-test the \
assistant or to push it to think creatively.

How to write it: between [Start Generation] and [End Generation] below is a template. Copy it \
and replace every placeholder in {{curly braces}} with content of your own.

[Start Generation]
{template}
[End Generation]

Rules:
- Do not put the answer, hints, or any part of a solution inside the input.
- Ask only for things a text-only assistant can do.
- Stop as soon as the template is filled in, and do not print [Start Generation] or \
[End Generation].
- If both the task and the template are None, decide for yourself what to ask and write a \
free-form instruction."""

QUALITY_PROMPT = """Review the exchange below between a user and an AI assistant, and score it \
with the additive 7-point system described here. Start from 0 and add one point for each \
statement that is true:
1. From the instruction one can tell what task the user wants done.
2. The instruction is clear, specific and well structured.
3. The user can understand the response.
4. The response covers a substantial part of the user's question, even if not all of it.
5. The response answers the heart of the question usefully and in depth.
6. The response is clear, concise, well organised and helpful.
7. The user would probably enjoy the form and style of the response.

<Instruction>{instruction}</Instruction>

<Response>{response}</Response>

First justify your verdict in at most 100 words. Then write the sum of the points inside \
<Calculation></Calculation>, for example <Calculation>1+0+1+0+1+1+0=4</Calculation>, and finally \
the total inside <Score></Score>, for example <Score>4</Score>."""

REWARD_PROMPT = """Rate how well the AI assistant's response serves the user's instruction, on \
an integer scale from 0 to 7: 0 means unhelpful, wrong or harmful; 7 means an excellent answer \
that an expert would be glad to have written.

<Instruction>{instruction}</Instruction>

<Response>{response}</Response>

Explain your rating in at most 50 words, then give it inside <Score></Score>, for example \
<Score>5</Score>."""

PAIRWISE_PROMPT = """Two AI assistants were given the same instruction by a user. Compare their \
responses and decide which one serves the user better: which is more helpful, more correct, \
more complete where it matters, and clearer. Do not let the order of the responses sway you, \
and do not prefer a response for being longer: extra text counts only if it helps the user.

<Instruction>{instruction}</Instruction>

<Response A>{answer_a}</Response A>

<Response B>{answer_b}</Response B>

Explain your comparison in at most 60 words. Then end with your verdict: [[A]] if Response A is \
better, [[B]] if Response B is better, or [[tie]] if neither is better."""

# Varied on purpose: writing, reasoning, coding, advice, facts, math; some want one line, some a
# page.
EVAL_INSTRUCTIONS = [
    "Write a haiku about a lighthouse in winter.",
    "Write a short story, under 200 words, about a robot that is afraid of the dark.",
    "Draft a polite email to my landlord asking when the broken heater will be repaired.",
    "Give me five names for a bakery that only sells bread made with local grain.",
    "Rewrite this sentence so that it is easier to read: 'The implementation of the policy was "
    "undertaken by the committee subsequent to a lengthy period of deliberation.'",
    "Write a limerick about a cat who learns to use a computer.",
    "Write the opening paragraph of a mystery novel set on a night train.",
    "Summarize the plot of Romeo and Juliet in three sentences.",
    "If all bloops are razzies and all razzies are lazzies, are all bloops lazzies? Explain.",
    "A bat and a ball cost $1.10 together. The bat costs $1.00 more than the ball. "
    "How much does the ball cost?",
    "I have three boxes: one holds apples, one oranges, one both, and every label is wrong. "
    "I may take one fruit from one box. How do I relabel all the boxes correctly?",
    "Which is heavier, a kilogram of feathers or a kilogram of iron? Why do people get this wrong?",
    "Mary's father has five daughters: Nana, Nene, Nini, Nono. "
    "What is the name of the fifth daughter?",
    "Write a Python function that checks whether a string is a palindrome, "
    "ignoring case and spaces.",
    "Explain what this code does and how to make it faster:\n"
    "def f(n):\n    return n if n < 2 else f(n - 1) + f(n - 2)",
    "Write a SQL query that returns the three customers with the highest total order value from "
    "tables customers(id, name) and orders(id, customer_id, amount).",
    "What is the difference between a list and a tuple in Python? When would you use each?",
    "Write a bash one-liner that counts the lines in all .txt files in the current directory.",
    "Explain recursion to a ten-year-old, with an example.",
    "Find the bug: for i in range(1, len(items)): print(items[i])  # meant to print every item",
    "I keep procrastinating on my thesis. Give me a practical plan for the next week.",
    "How should I prepare for my first job interview as a software engineer?",
    "My friend is upset that I forgot her birthday. What should I say to her?",
    "What are some ways to save money on groceries without eating worse?",
    "I want to start running but I get bored quickly. Any tips?",
    "Should I learn Spanish or Mandarin first? Help me decide by asking the right questions.",
    "Why is the sky blue?",
    "What causes the seasons on Earth?",
    "Explain how vaccines train the immune system.",
    "What was the significance of the printing press in European history?",
    "What is the capital of Australia?",
    "How does a refrigerator keep food cold?",
    "Compare renewable and fossil energy sources in a short table of pros and cons.",
    "What is 17 multiplied by 24? Show your working.",
    "Solve for x: 3x + 7 = 25.",
    "A train travels 120 km in 1.5 hours. What is its average speed in km per hour?",
    "What is the probability of rolling two sixes with two fair dice?",
    "Prove that the sum of two even numbers is always even.",
    "Explain the Pythagorean theorem and give a real-life use of it.",
    "Plan a three-day trip to Rome for someone who loves history and food, "
    "with a schedule for each day.",
]
