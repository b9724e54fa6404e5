"""The model's forward passes under lsp.py's sampler and log-probs: padding, one prefill per
distinct prompt, picking a token, and the engineering that only makes them fast or small: the
CUDA-graph sampler (static KV cache, fixed shapes) and log-probs made in checkpointed chunks."""

import functools

import torch
from torch.nn.utils.rnn import pad_sequence
from transformers import DynamicCache, StaticCache


def pad(sequences, side, device):
    """Token lists -> ids [B, L] and mask [B, L], padded on the left or right with id 0.

    Every vocabulary has id 0 and the mask hides it. Never pad with EOS and mask by id: that
    would hide the real EOS tokens, and the policy would never learn to stop.
    """
    rows = [torch.tensor(s, dtype=torch.long) for s in sequences]
    ones = [torch.ones(len(s), dtype=torch.long) for s in sequences]
    ids = pad_sequence(rows, batch_first=True, padding_side=side)
    mask = pad_sequence(ones, batch_first=True, padding_side=side)
    return ids.to(device), mask.to(device)


def unpad(completion_ids, completion_mask):
    """Token lists of each row's sampled tokens, the stop token included."""
    return [ids[mask.bool()].tolist() for ids, mask in zip(completion_ids, completion_mask)]


def positions_from_mask(attention_mask):
    # [B, L]: counted from each row's first real token, so left padding changes nothing
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def prefill(model, prompts, cache):
    """Run each distinct prompt once into `cache`, then copy its cache to the rows holding it.

    The Challenger's N rows share one prompt, and a query's G answers another. Returns the
    last hidden state of each row [B, H] and its prompt mask [B, P].
    """
    unique = {prompt: i for i, prompt in enumerate(dict.fromkeys(map(tuple, prompts)))}
    rows = torch.tensor([unique[tuple(p)] for p in prompts], device=model.device)  # [B]
    prompt_ids, prompt_mask = pad(list(unique), "left", model.device)  # [U, P]
    output = model.base_model(input_ids=prompt_ids, attention_mask=prompt_mask,
                              position_ids=positions_from_mask(prompt_mask),
                              cache=cache, use_cache=True)
    hidden = output.last_hidden_state[rows, -1]  # [B, H]
    if len(unique) < len(prompts):
        # index_select: gradients flow back to the shared prompt's keys and values
        cache.reorder_cache(rows)
    return hidden, prompt_mask[rows]


@torch.no_grad()
def logits_after(judge, prompts, judged, suffix, stop_ids):
    """Next-token logits [M, V] after prompt + judge text (stop tokens dropped) + suffix."""
    sequences = [
        prompt + [t for t in text if t not in stop_ids] + suffix
        for prompt, text in zip(prompts, judged)
    ]
    hidden, _ = prefill(judge, sequences, DynamicCache(config=judge.config))  # [M, H]
    return judge.lm_head(hidden)  # [M, V]


def pick_tokens(logits, temperature, top_p, generator):
    """The next token of each row from logits [B, V]: greedy at temperature 0."""
    if temperature == 0:
        return logits.argmax(-1)  # [B]
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # [B, V]
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)  # [B, V]
        # drop a token once the likelier ones before it hold top_p of the mass
        sorted_probs[sorted_probs.cumsum(-1) - sorted_probs > top_p] = 0
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    # inverse CDF: one uniform number per row (torch.multinomial draws one per vocabulary
    # entry, 30x slower on a CPU); float64 keeps tiny probabilities
    cdf = probs.double().cumsum(-1)  # [B, V]
    uniform = torch.rand(len(cdf), 1, generator=generator, device=cdf.device, dtype=cdf.dtype)
    draws = (1 - uniform) * cdf[:, -1:]  # [B, 1], in (0, total]: never a token of probability 0
    return torch.searchsorted(cdf, draws).squeeze(-1)  # [B]


# --- The fast sampler: lsp.sample's tokens from fixed shapes, for CUDA graphs ----------------

# how often the sampler asks whether all rows stopped: each token on a CPU, where asking is
# free; every 16 on CUDA, where it waits for the GPU
SYNC_EVERY = {"cuda": 16}


@functools.cache
def decoder(device_type):
    """The fast sampler's forward: compiled for CUDA graphs on a GPU, eager on a CPU (where
    compiling gained nothing)."""
    if device_type != "cuda":
        return lambda model, **inputs: model(**inputs)
    # a model that does not compile decodes eagerly: the run goes on
    torch._dynamo.config.suppress_errors = True
    return torch.compile(lambda model, **inputs: model(**inputs), mode="reduce-overhead")


@torch.no_grad()
def sample_fast(model, prompts, max_new_tokens, stop_ids, temperature=1.0, top_p=1.0,
                generator=None):
    """lsp.sample's loop over a static KV cache with fixed shapes: the same tokens and mask.

    The cache holds the longest sequence rounded up to 64 tokens, so that few shapes compile;
    every step attends over the whole width (causality hides the columns not yet written).
    A GPU is asked whether all rows stopped only every SYNC_EVERY tokens.
    """
    length = -(-(max(map(len, prompts)) + max_new_tokens) // 64) * 64
    cache = StaticCache(config=model.config, max_cache_len=length)
    hidden, prompt_mask = prefill(model, prompts, cache)  # [B, H], [B, P]
    logits = model.lm_head(hidden)  # [B, V]
    for layer in cache.layers:  # copied to the rows: CUDA graphs need the addresses fixed
        torch._dynamo.mark_static_address(layer.keys)
        torch._dynamo.mark_static_address(layer.values)
    new_columns = prompt_mask.new_ones(len(prompts), length - prompt_mask.shape[1])
    attention_mask = torch.cat([prompt_mask, new_columns], 1)  # [B, L]
    forward = functools.partial(decoder(model.device.type), model)
    sync_every = SYNC_EVERY.get(model.device.type, 1)
    positions = prompt_mask.sum(-1, keepdim=True)  # [B, 1]: where each first new token stands
    stop = torch.tensor(stop_ids, device=model.device)
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=model.device)  # [B]
    tokens, sampled = [], []
    for step in range(max_new_tokens):
        picked = pick_tokens(logits, temperature, top_p, generator)  # [B]
        next_tokens = torch.where(finished, 0, picked)  # [B]
        tokens.append(next_tokens)
        sampled.append(~finished)
        finished |= torch.isin(next_tokens, stop)
        if step + 1 == max_new_tokens:
            break
        if (step + 1) % sync_every == 0 and finished.all():
            break
        output = forward(input_ids=next_tokens[:, None], attention_mask=attention_mask,
                         position_ids=positions + step, cache=cache, use_cache=True)
        logits = output.logits[:, -1]  # [B, V]
    return torch.stack(tokens, 1), torch.stack(sampled, 1).long()  # [B, T], [B, T]


# --- Log-probs under memory limits -----------------------------------------------------------

LOGPROB_CHUNK_TOKENS = 1024  # float32 [tokens, vocab] logits are made this many tokens at a time


def checkpointed_hidden(model, prompts, completion_ids, completion_mask):
    """The hidden states that predict each completion token [B, T, H], with activation
    checkpointing (--gradient-checkpointing): checkpointed layers keep no KV cache, so each
    row runs its prompt again instead of sharing one prefill."""
    prompt_ids, prompt_mask = pad(prompts, "left", model.device)  # [B, P]
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)  # [B, P+T]
    output = model.base_model(input_ids=torch.cat([prompt_ids, completion_ids], dim=1),
                              attention_mask=attention_mask,
                              position_ids=positions_from_mask(attention_mask),
                              use_cache=False)
    # the state at t predicts token t + 1
    return output.last_hidden_state[:, -completion_ids.shape[1] - 1:-1]  # [B, T, H]


def chunk_logprobs(lm_head, hidden, token_ids, temperature):
    """log-softmax of the tokens token_ids [B, c] after hidden states [B, c, H]."""
    # in place: the largest tensor of the update
    logits = lm_head(hidden).float().div_(temperature)  # [B, c, V]
    return logits.log_softmax(-1).gather(-1, token_ids[..., None]).squeeze(-1)  # [B, c]


def logprobs_in_chunks(lm_head, hidden, token_ids, temperature):
    """log softmax(lm_head(hidden) / temperature) at token_ids [B, T], a chunk of tokens at a
    time: float32 logits of a 128k vocabulary take 0.5 MB a token. Each chunk but the last,
    whose backward comes first, is recomputed in backward instead of kept."""
    batch, num_tokens = token_ids.shape
    width = max(1, LOGPROB_CHUNK_TOKENS // batch)
    logprobs = []
    for start in range(0, num_tokens, width):
        chunk = (lm_head, hidden[:, start:start + width], token_ids[:, start:start + width],
                 temperature)
        if start + width < num_tokens:
            logprobs.append(torch.utils.checkpoint.checkpoint(chunk_logprobs, *chunk,
                                                              use_reentrant=False))
        else:
            logprobs.append(chunk_logprobs(*chunk))
    return torch.cat(logprobs, dim=1)  # [B, T]
