"""LoRA (--lora R): the policy is the frozen starting model plus low-rank adapters, and only the
adapters train. pi_Ref and the judge are the same weights with the adapters off, so no second
copy of the model exists. Through peft, installed apart (`pip install peft`) as trl is for
bench_trl.py.

A checkpoint holds the adapters (peft's adapter_config.json and adapter_model.safetensors, 20 MB
for SmolLM2 at rank 16) and trainer_state.pt (AdamW's states: twice that). `lsp.load_model`
reads one as a plain model, its base with the adapters merged into the weights, for eval.py,
`eval.py merge` and --model.
"""

import json
import sys
from pathlib import Path

# the attention and MLP projections of Llama-style models (SmolLM2 and Llama 3 name them so)
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Without --learning-rate, --lora trains at this multiple of the full fine-tuning default
# (lsp.py's, or a game's). "LoRA Without Regret" (Schulman et al., 2025) found LoRA's best rate
# about 10x full fine-tuning's, with alpha 32, as our default 2R is at rank 16; on the game's dev
# set 10x did as well as 30x (docs/runs.md).
LEARNING_RATE_SCALE = 10


def import_peft():
    try:
        import peft
    except ImportError:
        sys.exit("error: --lora and LoRA checkpoints need peft: pip install peft")
    return peft


def add_adapters(model, args, saved=()):
    """The peft model around `model`, with new adapters or, to go on training, those of the
    newest of the `saved` checkpoints.

    New adapters start with B = 0, so the policy starts as the model. `model` holds them in its
    own layers and is what the trainer calls; the peft model saves them and turns them off.
    """
    peft = import_peft()
    if saved:
        return peft.PeftModel.from_pretrained(model, saved[-1], is_trainable=True)
    config = peft.LoraConfig(r=args.lora, lora_alpha=args.lora_alpha or 2 * args.lora,
                             lora_dropout=args.lora_dropout, target_modules=TARGET_MODULES,
                             task_type="CAUSAL_LM")
    adapted = peft.get_peft_model(model, config)
    # what `base_model_name` reads back: --model as given ('smollm2', a hub id or a path)
    adapted.peft_config["default"].base_model_name_or_path = args.model
    return adapted


def base_model_name(path):
    """The --model a LoRA checkpoint's adapters were trained on, or None if `path` is not one."""
    config = Path(path) / "adapter_config.json"
    if not config.is_file():
        return None
    return json.loads(config.read_text())["base_model_name_or_path"]


def merged(model, checkpoint):
    """`model`, the checkpoint's base, with the checkpoint's adapters added into its weights."""
    return import_peft().PeftModel.from_pretrained(model, checkpoint).merge_and_unload()
