"""Self-Play Fine-Tuning (SPIN): a model learns to tell the data's responses from its own, until it
cannot.

Chen et al., "Self-Play Fine-Tuning Converts Weak Language Models to Strong Language Models",
arXiv 2401.01335. Where LSP (lsp.py) needs a reward and no data, SPIN needs SFT data, prompts x
with human responses y, and no reward. Both players are one model at two moments. Each
iteration t:

    1. freeze the current model as the opponent p_t
    2. the opponent answers every prompt of the data: y' ~ p_t(. | x)
    3. the main player p trains for --epochs on the paper's Eq. 4.7 with the logistic loss
           l(lam * [log p(y|x) / p_t(y|x) - log p(y'|x) / p_t(y'|x)]),  l(t) = log(1 + e^-t),
       log-probs summed over the response tokens: the human response up, the opponent's down
    4. the trained model is p_{t+1}, the next opponent.

Once the model writes like the data, y and y' look alike and the expected gradient is zero:
SPIN's fixed point is the data distribution.

Choices and deviations:
    1. The frozen opponent scores y and y' once, after sampling: training holds one model, and
       a run killed mid-iteration resumes from the "game" (y', scores, batch order) in its
       checkpoint.
    2. Log-probs at temperature 1, whatever --temperature sampled y'. A human response ends
       with EOS, like a sample with its stop token, so the player learns when to stop; both
       are cut at --max-completion-length.
    3. AdamW (no weight decay) at a constant rate, clipping at 1.0, batches of 8 pairs; the
       paper: RMSProp, 10% warmup then linear decay, 64 pairs. On CUDA, lsp.py's bf16 weights
       with 8-bit AdamW.
    4. --learning-rate 1e-5, not the paper's 5e-7 (7B, ~1600 steps an iteration): on the train
       split 5e-7 hardly moves the loss in 4 steps, and 5e-5 drives it to 0 mostly by pushing
       y' down (docs/spin.md).

Run (from the repository root; spin_data/ holds a small SFT set written for this project):
    python spin.py --model smollm2 --heldout spin_data/heldout.jsonl --out runs/spin  # CPU
    python spin.py --resume runs/spin --iterations 3             # one iteration more
    python spin.py score --model runs/spin/checkpoint-000020 --data spin_data/heldout.jsonl
"""

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import AutoModelForCausalLM

import lsp
from machinery.devices import default_device, make_optimizer
from machinery.inputs import chat_prompt
from machinery.logs import json_line, open_logs
from machinery.options import (add_run_options, check_model_names, check_ranges, check_run_dir,
                               parse_with_resume)
from machinery.runs import (checkpoints, load_training_state, resume, save_checkpoint,
                            training_state, StopRequest)


# --- Options ---------------------------------------------------------------------------------

# options that may change when a run resumes: they change neither the data nor the algorithm
RESUMABLE = {"iterations", "heldout", "micro_batch_size", "save_every", "keep", "out", "resume"}


def parse_args(argv=None):
    """The options and the data, checked before any model loads (as lsp.parse_args)."""
    parser = argparse.ArgumentParser(
        description="Self-Play Fine-Tuning (SPIN) on prompt/response data.")
    arg = parser.add_argument
    arg("command", nargs="?", choices=("train", "score"), default="train",
        help="train (default), or score: the log-likelihood of --data's responses")
    # model and data
    arg("--model", default="smollm2", help="model to train: hub id, local path or 'smollm2'")
    arg("--data", default="spin_data/train.jsonl",
        help='SFT data: JSONL, one {"prompt", "response"} a line')
    arg("--heldout", help="JSONL like --data, scored before and after each iteration")
    # self-play
    arg("--iterations", type=int, default=2, help="each one's trained model is the next opponent")
    arg("--epochs", type=int, default=2, help="passes over the data per iteration (paper: 2)")
    arg("--lam", type=float, default=0.1, help="lambda, the scale inside the loss (paper: 0.1)")
    arg("--temperature", type=float, default=1.0, help="opponent sampling temperature")
    arg("--top-p", type=float, default=1.0, help="opponent nucleus sampling")
    arg("--max-completion-length", type=int, default=256,
        help="longest response, sampled or human (paper: 256)")
    # optimization
    arg("--learning-rate", type=float, default=1e-5, help="AdamW learning rate (paper: 5e-7)")
    arg("--batch-size", type=int, default=8, help="pairs per optimizer step")
    arg("--micro-batch-size", type=int, default=4, help="pairs per forward and backward")
    arg("--max-grad-norm", type=float, default=1.0, help="gradient clipping")
    # the run (--save-every: also after each iteration)
    add_run_options(parser, out="runs/spin", save_every=50)
    args = parse_with_resume(parser, argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # one process would not see the others
        parser.error("spin.py runs in one process; torchrun is for lsp.py")

    counts = ["iterations", "epochs", "max_completion_length", "batch_size", "micro_batch_size",
              "save_every", "keep"]
    positive = ["lam", "learning_rate", "temperature", "max_grad_norm", "top_p"]
    check_ranges(parser, args, dict.fromkeys(counts, 1), positive)
    if args.top_p > 1:
        parser.error("--top-p must be at most 1")
    check_model_names(parser, args, "--model")
    if args.command == "score":
        return args
    check_run_dir(parser, args, RESUMABLE, "spin.py")
    for path in filter(None, (args.data, args.heldout)):
        read_pairs(path)  # exits with a message if the file cannot serve
    return args


# --- Data ------------------------------------------------------------------------------------

def read_pairs(path):
    """(prompt, response) pairs from a JSONL file, one object with both texts a line.

    Anything else (an empty line, bad JSON, a missing, empty or non-text field) stops with the
    line and what is wrong with it: a pair dropped in silence would change what the model
    converges to.
    """
    def fail(problem):
        sys.exit(f"error: {path}: {problem}; each line must be one JSON object like "
                 '{"prompt": "What is 2 + 3?", "response": "2 + 3 = 5."}')

    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        fail(f"cannot be read ({type(error).__name__}: {error})")
    pairs = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            fail(f"line {number} is {'empty' if not line.strip() else f'not valid JSON ({error})'}")
        for field in ("prompt", "response"):
            text = record.get(field) if isinstance(record, dict) else None
            if not isinstance(text, str) or not text.strip():
                fail(f'line {number} has no text in a "{field}" field')
        pairs.append((record["prompt"], record["response"]))
    return pairs or fail("it holds no pairs")


def encode_pairs(tokenizer, pairs, max_length, date=None):
    """Token lists (prompts, responses). Each prompt is one user turn, as the opponent sees it;
    each human response is the assistant's text and EOS (choice 2), cut at max_length tokens."""
    prompts = [chat_prompt(tokenizer, prompt, date) for prompt, _ in pairs]
    responses = []
    for _, response in pairs:
        ids = tokenizer(response.strip(), add_special_tokens=False,
                        split_special_tokens=True).input_ids
        responses.append((ids + [tokenizer.eos_token_id])[:max_length])
    return prompts, responses


# --- Loss (the paper's Eq. 4.7) --------------------------------------------------------------

def spin_loss(logp_real, logp_fake, ref_logp_real, ref_logp_fake, lam):
    """Per-pair SPIN loss [B] from sequence log-probs [B] of the human response y and of the
    opponent's y', under the main player (logp_*) and under the opponent (ref_logp_*).

    Here the margin is 1 * (1 - -1) = 2:
    >>> spin_loss(torch.tensor([-10.]), torch.tensor([-12.]), torch.tensor([-11.]),
    ...           torch.tensor([-11.]), lam=1.0)
    tensor([0.1269])
    """
    margin = lam * ((logp_real - ref_logp_real) - (logp_fake - ref_logp_fake))  # [B]
    return F.softplus(-margin)  # [B]: log(1 + exp(-margin)), no overflow for a large -margin


def sequence_logprobs(model, prompts, completions, batch_size):
    """log p(completion | prompt) summed over its tokens [N], at temperature 1 (choice 2), and
    the completions' lengths [N]."""
    sums, lengths = [], []
    for i in range(0, len(prompts), batch_size):
        logprobs, mask = lsp.token_logprobs(model, prompts[i:i + batch_size],
                                            completions[i:i + batch_size], 1.0)  # [b, T] each
        sums.append(logprobs.sum(-1))
        lengths.append(mask.sum(-1))
    return torch.cat(sums), torch.cat(lengths)


@torch.no_grad()
def heldout_score(model, tokenizer, pairs, batch_size, date=None):
    """How likely the model finds the human responses: log-likelihood per token, EOS included."""
    prompts, responses = encode_pairs(tokenizer, pairs, max_length=10**9, date=date)
    logprobs, lengths = sequence_logprobs(model, prompts, responses, batch_size)  # [N], [N]
    total, tokens = logprobs.sum().item(), int(lengths.sum())
    return {"pairs": len(pairs), "tokens": tokens, "logp_per_token": total / tokens,
            "perplexity": math.exp(-total / tokens)}


# --- One iteration: the game and the updates -------------------------------------------------

class SelfPlayFineTuning:
    """The main player (`policy`, trained) and the current iteration's game."""

    generation_batch = 32  # prompts the opponent answers at once
    adapters = None  # the whole model trains: spin.py has no --lora

    def __init__(self, args, policy, tokenizer):
        self.args, self.policy, self.tokenizer = args, policy, tokenizer
        self.pairs = read_pairs(args.data)
        self.prompts, self.real = encode_pairs(tokenizer, self.pairs, args.max_completion_length,
                                               args.chat_date)
        self.stop_ids = lsp.stop_token_ids(policy, tokenizer)
        self.generator = torch.Generator(policy.device).manual_seed(args.seed)
        self.optimizer = make_optimizer(policy.parameters(), args.learning_rate, policy.device)
        # set by `play`: y', the opponent's log-probs, each epoch's batch order, step metrics
        self.game = None

    def state_dict(self):  # the optimizer, the random states and this iteration's game
        return {**training_state(self.optimizer, self.generator), "game": self.game}

    def load_state_dict(self, state):
        load_training_state(state, self.optimizer, self.generator)
        self.game = state["game"]

    @torch.no_grad()
    def play(self):
        """Steps 1 and 2: a frozen copy of the main player, the opponent p_t, answers every
        prompt and scores y and y' once (choice 1); each epoch's order of the pairs is drawn
        too. Returns the episode dicts."""
        args, started = self.args, time.perf_counter()
        opponent = lsp.freeze(copy.deepcopy(self.policy))
        fake = []  # y': token lists, each with its stop token
        for i in range(0, len(self.prompts), self.generation_batch):
            prompts = self.prompts[i:i + self.generation_batch]
            completion_ids, completion_mask = lsp.sample(
                opponent, prompts, args.max_completion_length, self.stop_ids, args.temperature,
                args.top_p, self.generator)
            fake += lsp.unpad(completion_ids, completion_mask)
        batch = args.micro_batch_size
        ref_real, _ = sequence_logprobs(opponent, self.prompts, self.real, batch)  # [N]
        ref_fake, fake_lengths = sequence_logprobs(opponent, self.prompts, fake, batch)  # [N]
        del opponent  # choice 1: the game holds all that training needs from it
        orders = [
            torch.randperm(len(fake), generator=self.generator,
                           device=self.generator.device).tolist()
            for _ in range(args.epochs)
        ]
        clipped = [tokens[-1] not in self.stop_ids for tokens in fake]
        stats = {"generated_length": fake_lengths.float().mean().item(),
                 "generated_clipped_rate": sum(clipped) / len(clipped),
                 "time/play": time.perf_counter() - started}
        self.game = {"fake": fake, "ref_logp_real": ref_real.float().cpu(),
                     "ref_logp_fake": ref_fake.float().cpu(), "order": orders, "metrics": [],
                     "stats": stats}
        texts = self.tokenizer.batch_decode(fake, skip_special_tokens=True)
        return [
            {"prompt": prompt, "response": response, "generated": text, "generated_clipped": cut,
             "ref_logp_real": real, "ref_logp_generated": generated}
            for (prompt, response), text, cut, real, generated
            in zip(self.pairs, texts, clipped, ref_real.tolist(), ref_fake.tolist())
        ]

    def train_step(self, rows):
        """Step 3 on one batch (indices of pairs): one optimizer step on the mean SPIN loss."""
        args, game = self.args, self.game
        self.optimizer.zero_grad(set_to_none=True)
        seen = []
        for start in range(0, len(rows), args.micro_batch_size):
            micro = rows[start:start + args.micro_batch_size]
            # y and y' of the micro-batch's pairs in one forward pass: 2b sequences
            prompts = [self.prompts[i] for i in micro] * 2
            responses = [self.real[i] for i in micro] + [game["fake"][i] for i in micro]
            logprobs, _ = lsp.token_logprobs(self.policy, prompts, responses, 1.0)  # [2b, T]
            logp_real, logp_fake = logprobs.sum(-1).chunk(2)  # [b], [b]
            ref_real = game["ref_logp_real"][micro].to(logp_real.device)  # [b]
            ref_fake = game["ref_logp_fake"][micro].to(logp_real.device)  # [b]
            loss = spin_loss(logp_real, logp_fake, ref_real, ref_fake, args.lam)  # [b]
            # gradients add up over micro-batches to the batch mean
            (loss.sum() / len(rows)).backward()
            seen.append(torch.stack([loss, logp_real, logp_fake, ref_real, ref_fake], 1).detach())
        parameters = self.policy.parameters()
        grad_norm = torch.nn.utils.clip_grad_norm_(parameters, args.max_grad_norm).item()
        if math.isfinite(grad_norm):  # a NaN or inf gradient skips the step
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss, logp_real, logp_fake, ref_real, ref_fake = torch.cat(seen).float().cpu().T  # [B]
        real = args.lam * (logp_real - ref_real)  # [B], the rewards lam log p / p_t
        fake = args.lam * (logp_fake - ref_fake)  # [B]
        # named as in the SPIN code
        return {"loss": loss.mean().item(), "rewards/real": real.mean().item(),
                "rewards/generated": fake.mean().item(),
                "rewards/margins": (real - fake).mean().item(),
                "rewards/accuracies": (real > fake).float().mean().item(),
                "logps/real": logp_real.mean().item(), "logps/generated": logp_fake.mean().item(),
                "grad_norm": grad_norm}


# --- Training loop: iterations, logs, checkpoints --------------------------------------------

def train(args, trainer, start_step=0):
    out = Path(args.out)
    per_epoch = math.ceil(len(trainer.pairs) / args.batch_size)
    per_iteration = args.epochs * per_epoch
    total = args.iterations * per_iteration
    if start_step >= total:
        return tqdm.write(f"{out} has already run {start_step // per_iteration} iterations; "
                          "pass more --iterations")
    heldout = read_pairs(args.heldout) if args.heldout else None

    def score():  # how likely the model now finds the held-out responses
        if not heldout:
            return {}
        scores = heldout_score(trainer.policy, trainer.tokenizer, heldout, args.micro_batch_size,
                               args.chat_date)
        return {f"heldout/{name}": value for name, value in scores.items()}

    steps = range(start_step + 1, total + 1)
    bar = tqdm(steps, initial=start_step, total=total, desc="SPIN", dynamic_ncols=True)
    with StopRequest() as stop, open_logs(out) as (metrics_file, episodes_file):
        if start_step == 0 and heldout:  # "iteration 0": the starting model
            metrics_file.write(json_line({"step": 0, "iteration": 0, "record": "iteration",
                                          **score()}))
        for step in bar:
            iteration = (step - 1) // per_iteration + 1
            index = (step - 1) % per_iteration
            epoch, batch = divmod(index, per_epoch)
            if index == 0:  # steps 1 and 2; a run resumed mid-iteration has its game
                episodes = trainer.play()
                episodes_file.write("".join(
                    json_line({"step": step, "iteration": iteration, **e}) for e in episodes))
                tqdm.write(f"--- iteration {iteration} | prompt: {episodes[0]['prompt'][:300]!r}"
                           f"\n    human: {episodes[0]['response'][:300]!r}"
                           f"\n    opponent: {episodes[0]['generated'][:300]!r}")
            started = time.perf_counter()
            order = trainer.game["order"][epoch]
            rows = order[batch * args.batch_size:(batch + 1) * args.batch_size]
            metrics = trainer.train_step(rows)
            # kept with the game: a resumed iteration still sums up all of its steps
            trainer.game["metrics"].append(metrics)
            metrics_file.write(json_line({"step": step, "iteration": iteration,
                                          "epoch": epoch + 1, "record": "step", **metrics,
                                          "time/step": time.perf_counter() - started}))
            bar.set_postfix(iteration=iteration, loss=f"{metrics['loss']:.4f}",
                            real_wins=f"{metrics['rewards/accuracies']:.2f}")
            if index == per_iteration - 1:  # step 4: the next opponent. Where did the game end?
                last_epoch = trainer.game["metrics"][-per_epoch:]
                means = {name: sum(m[name] for m in last_epoch) / per_epoch for name in metrics}
                summary = {"step": step, "iteration": iteration, "record": "iteration",
                           **trainer.game["stats"], **means, **score()}
                metrics_file.write(json_line(summary))
                heldout_text = ""
                if heldout:
                    heldout_text = f", held-out {summary['heldout/logp_per_token']:.4f} nats/token"
                tqdm.write(f"iteration {iteration}, last epoch: loss {summary['loss']:.4f}, "
                           f"real wins {summary['rewards/accuracies']:.0%}{heldout_text}")
            if step % args.save_every == 0 or index == per_iteration - 1 or stop.signal:
                save_checkpoint(trainer, out, step, args.keep)
            stop.exit_if_asked(step, "spin.py", out)
    tqdm.write(f"done: {args.iterations} iterations; metrics in {out / 'metrics.jsonl'}, "
               f"model in {checkpoints(out)[-1]}")


# --- Main ------------------------------------------------------------------------------------

def start(args):
    """Load the model: (trainer, first step). A run in --out continues from its newest
    checkpoint."""
    saved = checkpoints(args.out)
    torch.manual_seed(args.seed)
    device = default_device()
    model_path = str(saved[-1]) if saved else args.model
    tokenizer, policy = lsp.load_model(model_path, AutoModelForCausalLM, device)
    trainer = SelfPlayFineTuning(args, policy, tokenizer)
    return trainer, resume(trainer, args, device)


def main(argv=None):
    args = parse_args(argv)
    if args.command == "score":  # python spin.py score --model M --data FILE: one JSON line
        tokenizer, model = lsp.load_model(args.model, AutoModelForCausalLM, default_device())
        scored = heldout_score(model, tokenizer, read_pairs(args.data), args.micro_batch_size,
                               args.chat_date)
        return print(json.dumps({"model": args.model, "data": args.data, **scored}))
    try:
        train(args, *start(args))
    except KeyboardInterrupt:
        sys.exit("stopped without saving; resume from the newest checkpoint with: "
                 f"python spin.py --resume {args.out}")


if __name__ == "__main__":
    main()
