"""Many independent LoRA adapters trained and served in one batch over one frozen base model.

Why not PEFT: PEFT refuses batches that mix adapters in training mode, and training K adapters one after
another leaves a small model's matmuls too small to keep the CPU (or a GPU) busy. Here each adapter k has
its own LoRA parameters ``A_k`` (r, in) and ``B_k`` (out, r) per target Linear, and a forward hook adds
``scaling * x A_k^T B_k^T`` to adapter k's tokens: the participating adapters' weights are stacked so the
LoRA products of all of them are two batched matmuls. Because every adapter owns its parameters, a standard
optimizer with one parameter group per adapter gives each its own learning rate and step count, and an
adapter that sits a step out (no gradient) is left untouched, exactly as if it were trained alone.

The hooks sit on the base ``nn.Linear`` modules (inside PEFT's LoRA layers when the model is a PeftModel),
so PEFT adapters on the same model keep working; outside :meth:`StackedLoRA.route` the hooks add nothing.
Adapters are exported in PEFT's format (``adapter_config.json`` + ``adapter_model.safetensors``), which
PEFT and vLLM load like any other LoRA adapter.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel
from safetensors.torch import save_file
from torch import nn

INIT_ADAPTER = "stacked-lora-init"


def find_targets(model: nn.Module, target_modules: Sequence[str]) -> dict[str, nn.Linear]:
    """The base Linear layers whose last name component is in `target_modules`, keyed by PEFT module path.

    In a PeftModel the Linear is the LoRA layer's ``base_layer``; its key drops that suffix, so keys match
    PEFT's own module paths (``base_model.model.model.layers.0.self_attn.q_proj``).
    """
    wanted = set(target_modules)
    targets = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        key = name.removesuffix(".base_layer")
        if key.rsplit(".", 1)[-1] in wanted:
            targets[key] = module
    if not targets:
        raise ValueError(f"No Linear module of the model matches target_modules {sorted(wanted)}")
    return targets


class StackedLoRA(nn.Module):
    """K LoRA adapters of rank r on the same target modules of one frozen model.

    ``lora_A[k][i]`` (r, in) and ``lora_B[k][i]`` (out, r) are adapter k's weights on the i-th target
    module; its effective weight there is ``W + scaling * B @ A``, as in PEFT.
    """

    def __init__(
        self,
        model: nn.Module,
        num_adapters: int,
        r: int,
        lora_alpha: float,
        target_modules: Sequence[str],
        lora_dropout: float = 0.0,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        if num_adapters < 1:
            raise ValueError(f"num_adapters must be >= 1, got {num_adapters}")
        self.num_adapters, self.r, self.scaling = num_adapters, r, lora_alpha / r
        self.targets = find_targets(model, target_modules)
        self.names = list(self.targets)
        device = next(iter(self.targets.values())).weight.device

        def zeros(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.zeros(*shape, device=device, dtype=dtype))

        modules = list(self.targets.values())
        self.lora_A = nn.ModuleList(
            nn.ParameterList(zeros(r, m.in_features) for m in modules) for _ in range(num_adapters)
        )
        self.lora_B = nn.ModuleList(
            nn.ParameterList(zeros(m.out_features, r) for m in modules) for _ in range(num_adapters)
        )
        self.dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self._groups: list[int] | None = None
        self._tokens: torch.Tensor | None = None
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._handles = [module.register_forward_hook(self._make_hook(i)) for i, module in enumerate(modules)]

    def adapter_parameters(self, k: int) -> list[nn.Parameter]:
        """Adapter k's parameters (one optimizer parameter group per adapter)."""
        return [*self.lora_A[k], *self.lora_B[k]]

    def invalidate(self) -> None:
        """Forget the stacked copies used without gradients (call after the weights change)."""
        self._cache.clear()

    def _stacked(self, i: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Module i's weights of the routed adapters, stacked: (G, r, in) and (G, out, r).

        With gradients they are stacked anew (autograd routes each slice's gradient to its adapter's
        parameters). Without (generation, many forward calls per batch) the stack is cached, cast once to
        the autocast dtype.
        """
        groups = self._groups
        if torch.is_grad_enabled():
            a = torch.stack([self.lora_A[k][i] for k in groups])
            b = torch.stack([self.lora_B[k][i] for k in groups])
            return a, b
        device = x.device.type
        dtype = (
            torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else self.lora_A[0][i].dtype
        )
        key = (i, tuple(groups), dtype)
        if key not in self._cache:
            a = torch.stack([self.lora_A[k][i] for k in groups]).to(dtype)
            b = torch.stack([self.lora_B[k][i] for k in groups]).to(dtype)
            self._cache[key] = (a, b)
        return self._cache[key]

    def _make_hook(self, i: int):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
            if self._groups is None:
                return output
            x = inputs[0]
            a, b = self._stacked(i, x)
            groups = len(self._groups)
            if self._tokens is None:  # equal blocks of rows
                if x.shape[0] % groups:
                    raise RuntimeError(f"{x.shape[0]} rows cannot be split into {groups} adapter groups")
                xg = x.reshape(groups, -1, x.shape[-1])
            else:  # packed: gather each adapter's tokens (the extra zero row stands for padding)
                flat = x.reshape(-1, x.shape[-1])
                xg = torch.cat([flat, flat.new_zeros(1, flat.shape[-1])])[self._tokens]
            delta = torch.bmm(torch.bmm(self.dropout(xg.to(a.dtype)), a.transpose(1, 2)), b.transpose(1, 2))
            delta = (self.scaling * delta).to(output.dtype)
            if self._tokens is None:
                return output + delta.reshape(output.shape)
            out = output.reshape(-1, output.shape[-1])
            out = torch.cat([out, out.new_zeros(1, out.shape[-1])])
            out = out.index_add(0, self._tokens.reshape(-1), delta.reshape(-1, delta.shape[-1]))
            return out[:-1].reshape(output.shape)

        return hook

    @contextlib.contextmanager
    def route(
        self, groups: Sequence[int] | torch.Tensor, tokens: torch.Tensor | None = None
    ) -> Iterator[None]:
        """Apply adapters ``groups[g]`` (g = 0..G-1) to the batch inside this context.

        Without `tokens` the batch is G equal blocks of rows, block g for adapter groups[g] (generation).
        With `tokens`, a (G, T) tensor of positions in the flattened batch (``row * seq_len + col``), adapter
        groups[g] acts on the tokens listed in ``tokens[g]``; entries equal to the number of tokens in the
        batch are padding (packed training, see :func:`seal.ttt.pack_sequences`).
        """
        groups = [int(g) for g in groups]
        if not groups or min(groups) < 0 or max(groups) >= self.num_adapters:
            raise IndexError(f"adapter indices must be in [0, {self.num_adapters}), got {groups}")
        if tokens is not None and tokens.shape[0] != len(groups):
            raise ValueError(f"tokens has {tokens.shape[0]} groups, expected {len(groups)}")
        device = self.lora_A[0][0].device
        self._groups, self._tokens = groups, None if tokens is None else tokens.to(device)
        try:
            yield
        finally:
            self._groups, self._tokens = None, None

    def remove(self) -> None:
        """Detach the hooks: the model is exactly the base model again."""
        for h in self._handles:
            h.remove()
        self._handles = []

    # -- initialisation ---------------------------------------------------------------------------------

    @torch.no_grad()
    def init_adapter(
        self, k: int, seed: int, peft_model: PeftModel | None = None, config: LoraConfig | None = None
    ) -> None:
        """Initialise adapter k as a fresh PEFT LoRA adapter created after ``torch.manual_seed(seed)``.

        With a PeftModel the weights are exactly those PEFT itself would draw (a throwaway adapter is added
        and deleted), so batched and sequential TTT start from the same point for the same seed. Without
        one, A is drawn the way PEFT draws it (Kaiming-uniform, a=sqrt(5)) and B is zero.
        """
        if peft_model is not None and config is not None:
            torch.manual_seed(seed)
            peft_model.add_adapter(INIT_ADAPTER, config)
            try:
                modules = dict(peft_model.named_modules())
                for i, name in enumerate(self.names):
                    layer = modules[name]
                    self.lora_A[k][i].copy_(layer.lora_A[INIT_ADAPTER].weight)
                    self.lora_B[k][i].copy_(layer.lora_B[INIT_ADAPTER].weight)
            finally:
                peft_model.delete_adapter(INIT_ADAPTER)
        else:
            gen = torch.Generator(device="cpu").manual_seed(seed)
            for a, b in zip(self.lora_A[k], self.lora_B[k], strict=True):
                weight = torch.empty(a.shape, dtype=torch.float32)
                bound = 1 / math.sqrt(a.shape[1])  # kaiming_uniform_(a=sqrt(5)) on an (r, in) matrix
                a.copy_(weight.uniform_(-bound, bound, generator=gen))
                b.zero_()
        self.invalidate()

    # -- export -----------------------------------------------------------------------------------------

    def adapter_weights(self, k: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        pairs = zip(self.lora_A[k], self.lora_B[k], strict=True)
        return {name: (a.detach(), b.detach()) for name, (a, b) in zip(self.names, pairs, strict=True)}

    def peft_state_dict(self, k: int) -> dict[str, torch.Tensor]:
        """Adapter k with PEFT's saved key names (``base_model.model.<module>.lora_A.weight``)."""
        out = {}
        for name, (a, b) in self.adapter_weights(k).items():
            key = name if name.startswith("base_model.model.") else f"base_model.model.{name}"
            out[f"{key}.lora_A.weight"] = a.float().contiguous().cpu()
            out[f"{key}.lora_B.weight"] = b.float().contiguous().cpu()
        return out

    def save_adapter(self, k: int, path: str | os.PathLike, config: LoraConfig) -> Path:
        """Write adapter k as a PEFT adapter directory (safetensors), loadable by PEFT and vLLM."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(str(path))
        save_file(self.peft_state_dict(k), str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
        return path
