"""Held-out QA evaluation: the paper's table (base / passage / passage + self-edits ...) for any model.

    accelerate launch --config_file recipes/accelerate/cpu.yaml eval/run_eval.py \
        --config recipes/eval/squad-seal-smollm2-cpu.yaml

Writes results.json, results.md, accuracy_<setting>_<grader>.png, answers.jsonl and config.yaml (plus the
command) to eval_output_dir. Any field can be overridden on the command line, e.g. --eval_num_passages 5.
"""

from seal.cli import evaluate

if __name__ == "__main__":  # the guard matters: vLLM's engine and accelerate spawn processes
    evaluate()
