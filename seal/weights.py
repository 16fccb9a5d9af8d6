"""θ_r, the weights a round runs on: in SEAL's setting (`ttt_model: generator`) a self-edit is applied to
the model that wrote it, so after each update the generator's weights become the weights TTT trains
adapters on, the baseline is scored with and the next round samples from.

The TTT model stays one PeftModel for the whole run (its adapters, hooks and batched-TTT state survive);
only its frozen base weights are overwritten in place with the generator's full (merged) weights.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import load_file

from seal.generate.engine import vllm_engine
from seal.models import load_model, load_tokenizer
from seal.update import Update
from seal.utils import write_json

logger = logging.getLogger("seal")

MERGED = "merged"  # beside the update's adapter: the base with that adapter merged in
DONE = "seal_merged.json"


def merged_update(
    update: Update, base_path: str, dtype: str | None = None, out: str | Path | None = None
) -> Path:
    """The directory of the updated generator's full weights (safetensors + tokenizer): the update itself
    when it already is a model, else its adapter merged into the base (written once to `out`, by default
    next to the adapter; a marker written last, so an interrupted merge is redone). Main process only."""
    if update.kind != "adapter":
        return Path(update.path)
    out = Path(out) if out is not None else Path(update.path).parent / MERGED
    if (out / DONE).is_file():
        return out
    shutil.rmtree(out, ignore_errors=True)
    merged = PeftModel.from_pretrained(load_model(base_path, dtype), update.path).merge_and_unload()
    merged.save_pretrained(out, safe_serialization=True)
    tokenizer = load_tokenizer(base_path)
    tokenizer.save_pretrained(out)
    write_json(out / DONE, {"adapter": update.path, "base": base_path})
    logger.info("update merged into the base weights -> %s", out)
    return out


def base_parameters(model: PeftModel) -> dict[str, torch.nn.Parameter]:
    """The frozen base weights of a PEFT-wrapped model under their plain checkpoint names (LoRA weights and
    PEFT's ``.base_layer`` infix left out; tied weights once)."""
    return {
        name.replace(".base_layer", ""): p
        for name, p in model.get_base_model().named_parameters()
        if "lora_" not in name
    }


def load_weights(model: PeftModel, path: str | Path) -> None:
    """Overwrite the base weights of `model` in place with the checkpoint in `path` (every base weight must
    be there, with the same shape). Adapters are untouched. A quantized base cannot take full weights."""
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no .safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(f))
    params = base_parameters(model)
    missing = [n for n in params if n not in state]
    wrong = [n for n in params if n in state and state[n].shape != params[n].shape]
    if missing or wrong:
        raise ValueError(
            f"{path} does not hold the weights of this model: missing {missing[:3]}, other shape {wrong[:3]}"
        )
    with torch.no_grad():
        for name, p in params.items():
            if not p.is_floating_point():
                raise ValueError(
                    f"{name} is quantized ({p.dtype}): ttt_model=generator needs a full-precision base"
                )
            p.copy_(state[name].to(p.dtype))


def adopt_weights(
    path: str | Path, model: PeftModel, engine, hf, vllm, tokenizer, max_lora_rank: int, seed: int
):
    """Make the full weights in `path` the ones TTT trains on (:func:`load_weights`) and the engine serves;
    returns that engine: `hf` itself when it is the engine (it generates with the TTT model), else a vLLM
    engine rebuilt on `path` (the old one closed)."""
    load_weights(model, path)
    if engine is hf:
        return engine
    engine.close()
    return vllm_engine(vllm, str(path), tokenizer, max_lora_rank, seed)
