"""Float64 loop oracle of the noisy MoE projector (:class:`slime_adapters.projector.NoisyMoEProjector`): slow, obvious and dtype-agnostic.

Tests and benchmarks compare the fast module against it in float64; users who port the component
can hold their version to the same bar. Loops over samples, tiles, heads and tokens are the point:
each formula reads on its own.
"""

from __future__ import annotations

import torch
from torch import Tensor

from slime_adapters.testing.compressor import (
    gelu_reference,
    module_tensors,
    query_compressor_reference,
)

__all__ = ["mlp_reference", "noisy_moe_reference"]


def mlp_reference(sd: dict, prefix: str, x: Tensor) -> Tensor:
    hid = gelu_reference(x @ sd[f"{prefix}.0.weight"].T + sd[f"{prefix}.0.bias"])
    return hid @ sd[f"{prefix}.2.weight"].T + sd[f"{prefix}.2.bias"]


def noisy_moe_reference(module, x: Tensor, *, force_expert: int | None = None,
                        noise_sample: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """NoisyMoEProjector view by view with two separate expert outputs (no W2 fusion).

    Training mode needs ``noise_sample`` (b, s, 2): the oracle draws no random numbers.
    Returns ``(tokens (b, s, out_dim), gates (b, s, 2), aux_loss)`` in x's dtype.
    """
    sd = module_tensors(module, x.dtype)
    expert = module.force_expert if force_expert is None else force_expert
    q_prefix = "mlp" if module.query_mlp is None else "query_mlp"
    b, s, _ = x.shape
    tokens = x.new_zeros(b, s, module.out_dim)
    gates = x.new_zeros(b, s, 2)
    for i in range(b):
        if expert == 1:
            g = x.new_tensor([0.0, 1.0]).expand(s, 2)
        elif expert == 0:
            g = x.new_tensor([1.0, 0.0]).expand(s, 2)
        else:
            logits = x[i] @ sd["w_gate"]
            if module.training:
                if noise_sample is None:
                    raise ValueError("noisy_moe_reference: training mode needs noise_sample")
                raw = x[i] @ sd["w_noise"] if module.noise == "learned" else logits
                scale = torch.log1p(torch.exp(raw))
                if module.noise == "reference":
                    scale = scale + 0.01
                logits = logits + noise_sample[i].to(x.dtype) * scale
            e = torch.exp(logits - logits.max(-1, keepdim=True).values)
            g = e / e.sum(-1, keepdim=True)
            if module.mode == "reference":
                g = g / (g.sum(-1, keepdim=True) + 1e-6)
        gates[i] = g
        out = x.new_zeros(s, module.out_dim)
        if expert != 1:
            out = out + g[:, :1] * mlp_reference(sd, "mlp", x[i])
        if expert != 0:
            q = query_compressor_reference(module.query_expert, x[i:i + 1])[0]
            out = out + g[:, 1:] * mlp_reference(sd, q_prefix, q)
        tokens[i] = out
    aux = x.new_zeros(())
    if module.balance_loss_coef > 0 and expert is None:
        mean = gates.mean(dim=(0, 1))
        aux = module.balance_loss_coef * 2 * (mean[0] ** 2 + mean[1] ** 2)
    return tokens, gates, aux
