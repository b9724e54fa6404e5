"""Prompts for Language Self-Play, written in our own words after the structure in the paper.

CHALLENGER_PROMPT  makes the model write one instruction (the Challenger role).
QUALITY_PROMPT     the additive 7-point self-reward R_Q, judged by the frozen reference model.
REWARD_PROMPT      the task reward R when `--reward-model self` replaces a reward model.

The judge prompts end with the score inside <Score></Score>; `lsp.parse_score` reads it.
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
- Stop as soon as the template is filled in, and do not print [Start Generation] or [End Generation].
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
