"""The support code of lsp.py (and of spin.py, eval.py and the benches): everything a reader of
the algorithm can skip, by concern. It imports nothing of the project but itself.

    options      the options every run shares, lsp.py's engineering options, their checks
    inputs       the offline demo model, game and query files, reward functions, chat prompts
    forward      padding, shared prefills, token picking, the CUDA-graph sampler, chunked log-probs
    lora         LoRA adapters through peft: adding, resuming, merging a checkpoint
    devices      device and precision, 8-bit AdamW, the GPU memory check, timed phases, offloading
    logs         a step's metrics and episodes as JSON lines, the example shown, curriculum metrics
    runs         checkpoints, resume, the run directory, skipped updates, Ctrl-C and SIGTERM
    distributed  data parallel under torchrun; alone, every call is a no-op
"""
