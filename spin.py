"""
Self-Play Fine-Tuning (SPIN): a model learns to tell the data's responses from its own, until it cannot.

Chen et al., "Self-Play Fine-Tuning Converts Weak Language Models to Strong Language Models", arXiv
2401.01335. Where LSP (lsp.py) needs a reward and no data, SPIN needs SFT data, prompts x with human
responses y, and no reward. Both players are one model at two moments. Each iteration t:

    1. freeze the current model as the opponent p_t
    2. the opponent answers every prompt of the data: y' ~ p_t(. | x)
    3. the main player p trains for --epochs on (the paper's Eq. 4.7 with the logistic loss, `spin_loss`)
           l(lam * [log p(y|x) / p_t(y|x) - log p(y'|x) / p_t(y'|x)]),   l(t) = log(1 + exp(-t)),
       log-probs summed over the response tokens: the human response up, the opponent's down
    4. the trained model is p_{t+1}, the next opponent.
Once the model writes like the data, y and y' look alike and the expected gradient is zero: SPIN's
fixed point is the data distribution.

Choices and deviations:
    1. The frozen opponent scores y and y' once, after sampling: training holds one model, and a run
       killed mid-iteration resumes from the "game" (y', scores, batch order) in its checkpoint.
    2. Log-probs at temperature 1, whatever --temperature sampled y'. A human response ends with EOS,
       as a sample with its stop token, so the player learns when to stop; both are cut at --max-completion-length.
    3. AdamW (no weight decay) at a constant rate, clipping at 1.0, batches of 8 pairs; the paper:
       RMSProp, 10% warmup then linear decay, 64 pairs. On CUDA, lsp.py's bf16 with 8-bit AdamW.
    4. --learning-rate 1e-5, not the paper's 5e-7 (7B, ~1600 steps an iteration): on the train split, 5e-7
       hardly moves the loss in 4 steps, 5e-5 drives it to 0 mostly by pushing y' down (README).

Run (from the repository root; spin_data/ holds a small SFT set written for this project):
    python spin.py --model smollm2 --heldout spin_data/heldout.jsonl --out runs/spin   # 2 iterations, CPU
    python spin.py --resume runs/spin --iterations 3                                   # one iteration more
    python spin.py score --model runs/spin/checkpoint-000020 --data spin_data/heldout.jsonl
"""

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import AutoModelForCausalLM

import lsp

# --- Config ----------------------------------------------------------------------------------


def build_parser():
    parser = argparse.ArgumentParser(description="Self-Play Fine-Tuning (SPIN) on prompt/response data.")
    parser.add_argument("command", nargs="?", choices=("train", "score"), default="train",
                        help="train (default), or score: the log-likelihood of --data's responses under --model")
    # model and data
    parser.add_argument("--model", default="smollm2", help="model to train: hub id, local path, or 'smollm2' (offline)")
    parser.add_argument("--data", default="spin_data/train.jsonl", help="SFT data: JSONL, one {\"prompt\", \"response\"} a line")
    parser.add_argument("--heldout", help="JSONL like --data: log-likelihood of its responses before and after each iteration")
    # self-play
    parser.add_argument("--iterations", type=int, default=2, help="iterations; each one's trained model is the next opponent")
    parser.add_argument("--epochs", type=int, default=2, help="passes over the data per iteration (paper: 2)")
    parser.add_argument("--lam", type=float, default=0.1, help="lambda, the scale inside the logistic loss (paper: 0.1)")
    parser.add_argument("--temperature", type=float, default=1.0, help="opponent sampling temperature (paper: 1.0)")
    parser.add_argument("--top-p", type=float, default=1.0, help="opponent nucleus sampling (paper: 1.0)")
    parser.add_argument("--max-completion-length", type=int, default=256, help="longest response, sampled or human (paper: 256)")
    parser.add_argument("--chat-date", help="date that chat templates print (Llama 3); default: the run's first day")
    # optimization
    parser.add_argument("--learning-rate", type=float, default=1e-5, help="AdamW learning rate (paper: 5e-7 for 7B)")
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per optimizer step")
    parser.add_argument("--micro-batch-size", type=int, default=4, help="pairs per forward/backward")
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping")
    # outputs
    parser.add_argument("--out", default="runs/spin", help="run directory; an existing run there is resumed")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR with its saved options")
    parser.add_argument("--save-every", type=int, default=50, help="checkpoint every this many steps, and after each iteration")
    parser.add_argument("--keep", type=int, default=3, help="keep only the newest this many checkpoints")
    parser.add_argument("--seed", type=int, default=0, help="seeds torch, the sampler and the batch order")
    return parser


# options that may differ when a run is resumed: they change neither the data nor the algorithm
RESUMABLE_CHANGES = {"iterations", "heldout", "micro_batch_size", "save_every", "keep", "out", "resume"}


def parse_args(argv=None):
    """Parse and check the options, and the data, before any model is loaded (as lsp.parse_args)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.resume:  # the run's saved options become the defaults; options given here override them
        config = Path(args.resume) / "config.json"
        if not config.exists():
            parser.error(f"--resume {args.resume}: no run there ({config} is missing)")
        parser.set_defaults(**json.loads(config.read_text()))
        args = parser.parse_args(argv)
        args.out = args.resume
    for name in ("iterations", "epochs", "max_completion_length", "batch_size", "micro_batch_size", "save_every", "keep"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if min(args.lam, args.learning_rate, args.temperature, args.max_grad_norm, args.top_p) <= 0 or args.top_p > 1:
        parser.error("--lam, --learning-rate, --temperature, --max-grad-norm and --top-p must be > 0, --top-p at most 1")
    if lsp.model_name_problem(args.model):
        parser.error(f"--model {args.model}: {lsp.model_name_problem(args.model)}")
    if args.command == "score":
        return args
    config = Path(args.out) / "config.json"
    saved = json.loads(config.read_text()) if config.exists() else {}
    args.chat_date = args.chat_date or saved.get("chat_date") or time.strftime("%d %b %Y")
    changed = [f"--{name.replace('_', '-')} {saved[name]!r} (now {value!r})" for name, value in vars(args).items()
               if name in saved and name not in RESUMABLE_CHANGES and saved[name] != value]
    if changed:
        parser.error(f"{args.out} holds a run started with other options: {', '.join(changed)}. Continue it with "
                     f"`python spin.py --resume {args.out}`, or choose another --out.")
    if not saved and Path(args.out).is_dir() and any(Path(args.out).iterdir()):
        parser.error(f"{args.out} is not empty and holds no SPIN run (no config.json); choose another --out")
    for path in filter(None, (args.data, args.heldout)):
        read_pairs(path)  # exits with a message if the file cannot serve
    return args


# --- Data ------------------------------------------------------------------------------------

def read_pairs(path):
    """(prompt, response) pairs from a JSONL file, one object with both texts a line. Anything else (an empty
    line, bad JSON, a missing, empty or non-text field) stops with the line and what is wrong with it: a pair
    dropped in silence would change what the model converges to."""
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
            if not isinstance(record, dict) or not isinstance(record.get(field), str) or not record[field].strip():
                fail(f"line {number} has no text in a \"{field}\" field")
        pairs.append((record["prompt"], record["response"]))
    return pairs or fail("it holds no pairs")


def encode_pairs(tokenizer, pairs, max_length, date=None):
    """Token lists (prompts, responses): each prompt as one user turn, as the opponent sees it; each human
    response as the assistant's text followed by EOS (choice 2), cut at max_length tokens."""
    prompts = [lsp.chat_prompt(tokenizer, prompt, date) for prompt, _ in pairs]
    responses = [(tokenizer(response.strip(), add_special_tokens=False, split_special_tokens=True).input_ids
                  + [tokenizer.eos_token_id])[:max_length] for _, response in pairs]
    return prompts, responses


# --- Loss (paper, Eq. 4.7) -------------------------------------------------------------------

def spin_loss(logp_real, logp_fake, ref_logp_real, ref_logp_fake, lam):
    """Per-pair SPIN loss [B] from sequence log-probs [B]: of the human response y and the opponent's y'
    under the main player (logp_*) and under the opponent (ref_logp_*). Here the margin is 1 * (1 - -1) = 2:
    >>> spin_loss(torch.tensor([-10.]), torch.tensor([-12.]), torch.tensor([-11.]), torch.tensor([-11.]), lam=1.0)
    tensor([0.1269])
    """
    margin = lam * ((logp_real - ref_logp_real) - (logp_fake - ref_logp_fake))  # [B]
    return F.softplus(-margin)  # [B]: log(1 + exp(-margin)), without overflow for a large negative margin


def sequence_logprobs(model, prompts, completions, batch_size):
    """log p(completion | prompt) summed over its tokens [N], at temperature 1 (choice 2), and lengths [N]."""
    batches = [lsp.token_logprobs(model, prompts[i:i + batch_size], completions[i:i + batch_size], 1.0)
               for i in range(0, len(prompts), batch_size)]  # (logprobs [b, T], mask [b, T]) each
    return torch.cat([logprobs.sum(-1) for logprobs, _ in batches]), torch.cat([mask.sum(-1) for _, mask in batches])


@torch.no_grad()
def heldout_score(model, tokenizer, pairs, batch_size, date=None):
    """How likely the model finds the human responses: log-likelihood per token (EOS included) over all pairs."""
    prompts, responses = encode_pairs(tokenizer, pairs, max_length=10**9, date=date)
    logprobs, lengths = sequence_logprobs(model, prompts, responses, batch_size)  # [N], [N]
    total, tokens = logprobs.sum().item(), int(lengths.sum())
    return {"pairs": len(pairs), "tokens": tokens, "logp_per_token": total / tokens, "perplexity": math.exp(-total / tokens)}


# --- One iteration: the game and the updates -------------------------------------------------

class SelfPlayFineTuning:
    """The main player (`policy`, trained) and the current iteration's game against its opponent."""

    generation_batch = 32  # prompts the opponent answers at once

    def __init__(self, args, policy, tokenizer):
        self.args, self.policy, self.tokenizer = args, policy, tokenizer
        self.pairs = read_pairs(args.data)
        self.prompts, self.real = encode_pairs(tokenizer, self.pairs, args.max_completion_length, args.chat_date)
        self.stop_ids = lsp.stop_token_ids(policy, tokenizer)
        self.generator = torch.Generator(policy.device).manual_seed(args.seed)
        self.optimizer = (lsp.adamw_8bit_stochastic_rounding(policy.parameters(), args.learning_rate)
                          if policy.device.type == "cuda" else
                          torch.optim.AdamW(policy.parameters(), lr=args.learning_rate, weight_decay=0.0))
        self.game = None  # set by `play`: y', the opponent's log-probs, each epoch's batch order, step metrics

    def state_dict(self):  # for lsp.save_checkpoint: lsp's optimizer and RNG states, and this iteration's game
        return {**lsp.SelfPlay.state_dict(self), "game": self.game}

    def load_state_dict(self, state):
        lsp.SelfPlay.load_state_dict(self, state)
        self.game = state["game"]

    @torch.no_grad()
    def play(self):
        """Steps 1 and 2: a frozen copy of the main player, the opponent p_t, answers every prompt and scores
        y and y' once (choice 1); the pairs' order for each epoch is drawn too. Returns the episode dicts."""
        args, started = self.args, time.perf_counter()
        opponent = lsp.freeze(copy.deepcopy(self.policy))
        batch = self.generation_batch
        fake = [tokens for i in range(0, len(self.prompts), batch)  # y': token lists, each with its stop token
                for tokens in lsp.unpad(*lsp.sample(opponent, self.prompts[i:i + batch], args.max_completion_length,
                                                    self.stop_ids, args.temperature, args.top_p, self.generator))]
        ref_real, _ = sequence_logprobs(opponent, self.prompts, self.real, args.micro_batch_size)  # [N]
        ref_fake, fake_lengths = sequence_logprobs(opponent, self.prompts, fake, args.micro_batch_size)  # [N]
        del opponent  # choice 1: the game holds all that training needs from it
        orders = [torch.randperm(len(fake), generator=self.generator, device=self.generator.device).tolist()
                  for _ in range(args.epochs)]
        clipped = [tokens[-1] not in self.stop_ids for tokens in fake]
        self.game = {"fake": fake, "ref_logp_real": ref_real.float().cpu(), "ref_logp_fake": ref_fake.float().cpu(),
                     "order": orders, "metrics": [], "stats": {
                         "generated_length": fake_lengths.float().mean().item(),
                         "generated_clipped_rate": sum(clipped) / len(clipped), "time/play": time.perf_counter() - started}}
        return [{"prompt": prompt, "response": response, "generated": text, "generated_clipped": cut,
                 "ref_logp_real": real, "ref_logp_generated": generated} for (prompt, response), text, cut, real, generated
                in zip(self.pairs, self.tokenizer.batch_decode(fake, skip_special_tokens=True), clipped,
                       ref_real.tolist(), ref_fake.tolist())]

    def train_step(self, rows):
        """Step 3 on one batch (indices of pairs): one optimizer step on the mean SPIN loss. Returns metrics."""
        args, game = self.args, self.game
        self.optimizer.zero_grad(set_to_none=True)
        seen = []
        for start in range(0, len(rows), args.micro_batch_size):
            micro = rows[start:start + args.micro_batch_size]
            # y and y' of the micro-batch's pairs in one forward pass: 2b sequences
            logprobs, _ = lsp.token_logprobs(self.policy, [self.prompts[i] for i in micro] * 2,
                                             [self.real[i] for i in micro] + [game["fake"][i] for i in micro], 1.0)
            logp_real, logp_fake = logprobs.sum(-1).chunk(2)  # [b], [b]
            ref_real, ref_fake = (game[key][micro].to(logp_real.device) for key in ("ref_logp_real", "ref_logp_fake"))
            loss = spin_loss(logp_real, logp_fake, ref_real, ref_fake, args.lam)  # [b]
            (loss.sum() / len(rows)).backward()  # gradients add up across micro-batches to the batch mean
            seen.append(torch.stack([loss, logp_real, logp_fake, ref_real, ref_fake], 1).detach())  # [b, 5]
        grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), args.max_grad_norm).item()
        if math.isfinite(grad_norm):  # a NaN or inf gradient skips the step instead of breaking the weights
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss, logp_real, logp_fake, ref_real, ref_fake = torch.cat(seen).float().cpu().T  # [B] each
        real, fake = args.lam * (logp_real - ref_real), args.lam * (logp_fake - ref_fake)  # rewards lam log p / p_t, [B]
        # named as in the SPIN code
        return {"loss": loss.mean().item(), "rewards/real": real.mean().item(), "rewards/generated": fake.mean().item(),
                "rewards/margins": (real - fake).mean().item(), "rewards/accuracies": (real > fake).float().mean().item(),
                "logps/real": logp_real.mean().item(), "logps/generated": logp_fake.mean().item(), "grad_norm": grad_norm}


# --- Training loop: iterations, logs, checkpoints --------------------------------------------

def train(args, trainer, start_step=0):
    out = Path(args.out)
    per_epoch = math.ceil(len(trainer.pairs) / args.batch_size)
    per_iteration, total = args.epochs * per_epoch, args.iterations * args.epochs * per_epoch
    if start_step >= total:
        return tqdm.write(f"{out} has already run {start_step // per_iteration} iterations; pass more --iterations")
    heldout = read_pairs(args.heldout) if args.heldout else None

    def score():  # how likely the model now finds the held-out responses (nothing without --heldout)
        return {f"heldout/{name}": value for name, value in heldout_score(
            trainer.policy, trainer.tokenizer, heldout, args.micro_batch_size, args.chat_date).items()} if heldout else {}

    # line-buffered: each step's line reaches the disk at once, so a killed run loses at most its last step
    with lsp.StopRequest() as stop, open(out / "metrics.jsonl", "a", buffering=1) as metrics_file, \
            open(out / "episodes.jsonl", "a", buffering=1) as episodes_file:
        if start_step == 0 and heldout:  # "iteration 0": the starting model
            metrics_file.write(lsp.json_line({"step": 0, "iteration": 0, "record": "iteration", **score()}))
        bar = tqdm(range(start_step + 1, total + 1), initial=start_step, total=total, desc="SPIN", dynamic_ncols=True)
        for step in bar:
            iteration, index = (step - 1) // per_iteration + 1, (step - 1) % per_iteration
            epoch, batch = divmod(index, per_epoch)
            if index == 0:  # steps 1 and 2; a resumed run in mid-iteration has the game from its checkpoint
                episodes = trainer.play()
                episodes_file.write("".join(lsp.json_line({"step": step, "iteration": iteration, **e}) for e in episodes))
                tqdm.write(f"--- iteration {iteration} | prompt: {episodes[0]['prompt'][:300]!r}\n    human: "
                           f"{episodes[0]['response'][:300]!r}\n    opponent: {episodes[0]['generated'][:300]!r}")
            started = time.perf_counter()
            metrics = trainer.train_step(trainer.game["order"][epoch][batch * args.batch_size:(batch + 1) * args.batch_size])
            trainer.game["metrics"].append(metrics)  # saved with the game: a resumed iteration still sums up all its steps
            metrics_file.write(lsp.json_line({"step": step, "iteration": iteration, "epoch": epoch + 1, "record": "step",
                                              **metrics, "time/step": time.perf_counter() - started}))
            bar.set_postfix(iteration=iteration, loss=f"{metrics['loss']:.4f}", real_wins=f"{metrics['rewards/accuracies']:.2f}")
            if index == per_iteration - 1:  # step 4: this model is the next opponent. Where did the game end?
                last_epoch = trainer.game["metrics"][-per_epoch:]
                summary = {"step": step, "iteration": iteration, "record": "iteration", **trainer.game["stats"],
                           **{name: sum(m[name] for m in last_epoch) / per_epoch for name in metrics}, **score()}
                metrics_file.write(lsp.json_line(summary))
                heldout_text = f", held-out {summary['heldout/logp_per_token']:.4f} nats/token" if heldout else ""
                tqdm.write(f"iteration {iteration}, last epoch: loss {summary['loss']:.4f}, real wins "
                           f"{summary['rewards/accuracies']:.0%}{heldout_text}")
            if step % args.save_every == 0 or index == per_iteration - 1 or stop.signal:
                lsp.save_checkpoint(trainer, out, step, args.keep)
            if stop.signal:
                tqdm.write(f"stopped after step {step}, checkpoint saved. Resume with: python spin.py --resume {out}")
                sys.exit(128 + stop.signal)
    tqdm.write(f"done: {args.iterations} iterations; metrics in {out / 'metrics.jsonl'}, model in {lsp.checkpoints(out)[-1]}")


# --- Main ------------------------------------------------------------------------------------

def start(args):
    """Load the model and return (trainer, first step): a run in --out continues from its newest checkpoint."""
    out = Path(args.out)
    saved = lsp.checkpoints(out)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer, policy = lsp.load_model(str(saved[-1]) if saved else args.model, AutoModelForCausalLM, device)
    trainer = SelfPlayFineTuning(args, policy, tokenizer)
    start_step = 0
    if saved:  # read onto the CPU: RNG states must stay CPU byte tensors
        state = torch.load(saved[-1] / "trainer_state.pt", map_location="cpu", weights_only=True)
        trainer.load_state_dict(state)
        start_step = state["step"]
        tqdm.write(f"resuming {out} from {saved[-1].name}")
    out.mkdir(parents=True, exist_ok=True)
    lsp.write_atomically(out / "config.json", json.dumps({k: v for k, v in vars(args).items() if k != "resume"}, indent=1))
    for log in ("metrics.jsonl", "episodes.jsonl"):
        lsp.restore_log(out / log, start_step if saved else -1)  # no checkpoint yet: nothing written counts
    return trainer, start_step


def main(argv=None):
    args = parse_args(argv)
    if args.command == "score":  # python spin.py score --model M --data FILE: one JSON line
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        tokenizer, model = lsp.load_model(args.model, AutoModelForCausalLM, device)
        scored = heldout_score(model, tokenizer, read_pairs(args.data), args.micro_batch_size, args.chat_date)
        return print(json.dumps({"model": args.model, "data": args.data, **scored}))
    try:
        train(args, *start(args))
    except KeyboardInterrupt:
        sys.exit(f"stopped without saving; resume from the newest checkpoint with: python spin.py --resume {args.out}")


if __name__ == "__main__":
    main()
