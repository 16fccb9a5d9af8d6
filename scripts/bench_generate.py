"""Self-edit generation throughput, vLLM vs HF transformers: same prompts, same sampling, same batch.

    python scripts/bench_generate.py --num_passages 16 --num_self_edits 4 --max_new_tokens 128

Prints new tokens/s for each backend and their ratio, and writes them as JSON (--out).
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

from seal.config import GenerateConfig
from seal.data import load_passages
from seal.generate import HFEngine, Sampling
from seal.models import load_model, load_tokenizer, resolve_model_path
from seal.templates import build_prompt, get_template, render_chat


def count_new_tokens(tokenizer, outputs: list[list[str]]) -> int:
    return sum(len(tokenizer(text, add_special_tokens=False)["input_ids"]) for per in outputs for text in per)


def timed(generator, prompts, sampling, tokenizer) -> dict:
    generator.generate(prompts[:2], Sampling(n=1, max_new_tokens=8))  # warm-up
    start = time.perf_counter()
    outputs = generator.generate(prompts, sampling)
    seconds = time.perf_counter() - start
    tokens = count_new_tokens(tokenizer, outputs)
    return {"seconds": round(seconds, 2), "new_tokens": tokens, "tokens_per_s": round(tokens / seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="embedded:smollm2-135m-instruct")
    parser.add_argument("--dataset", default="sample")
    parser.add_argument("--num_passages", type=int, default=16)
    parser.add_argument("--num_self_edits", type=int, default=4)
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16", help="weights dtype of both backends")
    parser.add_argument("--out", default="runs/bench/generate_throughput.json")
    args = parser.parse_args()

    path = resolve_model_path(args.model)
    tokenizer = load_tokenizer(path)
    passages = load_passages(args.dataset, "train", limit=args.num_passages)
    template = get_template(GenerateConfig())
    prompts = [render_chat(tokenizer, build_prompt(template, p)) for p in passages]
    # ignore EOS-free comparisons: both backends stop at EOS, so we count the tokens each actually produced
    sampling = Sampling(
        n=args.num_self_edits, temperature=1.0, top_p=0.95, max_new_tokens=args.max_new_tokens, seed=0
    )
    batch = len(prompts) * args.num_self_edits

    hf = HFEngine(load_model(path, dtype=args.dtype), tokenizer, batch_size=batch, autocast_setting="none")
    results = {"hf": timed(hf, prompts, sampling, tokenizer)}
    del hf
    gc.collect()

    from seal.generate.vllm_backend import EngineSettings, VLLMEngine

    settings = EngineSettings(model=path, max_lora_rank=8, max_loras=1, max_model_len=2048, dtype=args.dtype)
    results["vllm"] = timed(VLLMEngine(settings, tokenizer), prompts, sampling, tokenizer)
    results["ratio_vllm_over_hf"] = round(results["vllm"]["tokens_per_s"] / results["hf"]["tokens_per_s"], 2)
    results["setup"] = {
        "prompts": len(prompts),
        "n": args.num_self_edits,
        "batch": batch,
        "max_new_tokens": args.max_new_tokens,
        "model": args.model,
        "dtype": args.dtype,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"HF   : {results['hf']['tokens_per_s']:8.1f} new tok/s ({results['hf']['new_tokens']} tokens)")
    print(f"vLLM : {results['vllm']['tokens_per_s']:8.1f} new tok/s ({results['vllm']['new_tokens']} tokens)")
    print(f"ratio vLLM/HF: {results['ratio_vllm_over_hf']}x  -> {args.out}")


if __name__ == "__main__":  # vLLM's engine spawns processes
    main()
