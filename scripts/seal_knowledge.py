"""SEAL knowledge incorporation: ReST-EM rounds of generate -> TTT -> reward -> filter -> update.

    accelerate launch --config_file recipes/accelerate/cpu.yaml scripts/seal_knowledge.py \
        --config recipes/knowledge/smollm2-135m-cpu.yaml
"""

from seal.cli import knowledge

if __name__ == "__main__":  # the guard matters: vLLM's engine and accelerate spawn processes
    knowledge()
