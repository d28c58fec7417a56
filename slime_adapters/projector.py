"""NoisyMoEProjector: a soft, noisily gated mixture of an MLP and a learnable-query expert
(SliME §2.1 "Global Context Refinement by Soft Mixture of Experts", SPEC §2.3).

Einops legend::

    b  images (global views)     s  vision tokens per view (= num_tokens)
    e  input width (in_dim)      o  output width (out_dim)      x  experts (2)

Math, per token t of every view (all views at once, no loop)::

    f_m(x)  = W2 · GELU(W1 x + b1) + b2                     the MLP expert, ``mlp``
    f_q(x)  = MLP_q(QueryCompressor_s(x))_t                 query expert: s learnable queries
                                                            (one per input token), then the MLP
                                                            (``mlp`` itself when shared)
    logit   = x · W_g (+ noise in training)                 (b, s, x), float32 under any autocast
    G(x)    = softmax(logit)
    out     = G0 f_m + G1 f_q

Noise (training only; ε ~ N(0, 1), or the ``noise_sample`` given to ``forward``):

* ``noise="learned"`` (the paper): ``ε · softplus(x · W_noise)``.
* ``noise="reference"`` (the released code, the rule its weights were trained with):
  ``ε · (softplus(x · W_g) + 0.01)``; ``W_noise`` exists but is never used.

Fusion. With a shared MLP, W2 is linear, so ``W2 (G0 h_m + G1 h_q) + (G0 + G1) b2`` (h = the
GELU activations) is the exact output with one W2 product instead of two. Paper gates sum to one;
reference gates are ``p / (Σp + 1e-6)`` as released, so that path computes
``(G0 + G1) · mlp[2](mix / (G0 + G1))``, still one product and still exact.

Modes. ``mode="reference"`` reproduces the released ``GatedBlock``: gates renormalised as above
(its top-2-of-2 selection is otherwise a no-op), the query expert's position table rounded
through float16, and the released buffers ``mean`` (0.0) and ``std`` (1.0) registered so that
released state dicts load strictly. Those two parametrise the ``Normal`` of the released
``_prob_in_top_k`` load estimate, which only runs when fewer experts are kept than exist (never,
with top-2 of 2): they take no part in any output and are absent in paper mode. The released
module also falls back to the MLP alone for inputs whose token count is not 576; here that is
the caller's choice (``projector.mlp(tokens)``), and ``forward`` rejects such input instead of
branching on shapes.

Roles (:meth:`NoisyMoEProjector.roles`, what the
:class:`~slime_adapters.schedule.AlternatingScheduler` trains): ``mlp_expert`` = ``mlp.*``;
``query_expert`` = ``query_expert.*`` (plus ``query_mlp.*`` when the MLP is not shared);
``gate`` = ``w_gate``, ``w_noise``. Together they hold every parameter exactly once.

Every rank runs the same kernels whatever the gates say (the mixture is dense), so sharded
training (ZeRO-3) cannot hang on a data-dependent expert choice.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slime_adapters.compressor import ATTN_BACKENDS, MODES, QueryCompressor, default_num_heads
from slime_adapters.config import (
    ConfigBase,
    ConfigError,
    ConfigurableMixin,
    check_bool,
    check_choice,
    check_int,
    check_number,
    config_field,
    config_setting,
)
from slime_adapters.layers import grid_side, mlp
from slime_adapters.schedule.roles import RoleSpec

__all__ = ["MoEOutput", "NoisyMoEProjector", "NoisyMoEProjectorConfig"]

NOISES = ("learned", "reference")
NUM_EXPERTS = 2
REFERENCE_NOISE_FLOOR = 0.01  # the released ``noise_epsilon``
REFERENCE_GATE_EPS = 1e-6  # the released top-k renormalisation epsilon


class MoEOutput(NamedTuple):
    """What :meth:`NoisyMoEProjector.forward` returns.

    tokens: ``(b, s, out_dim)`` projected tokens.
    gates: ``(b, s, 2)`` gate weights (expert 0 = MLP, 1 = query expert), float32 whatever the
        input precision (float64 for float64 input); one-hot when an expert is forced.
    aux_loss: scalar load-balancing loss in the gates' dtype (zero when ``balance_loss_coef`` is
        0 or an expert is forced); add it to the training loss.
    gate_mean: ``(2,)`` mean gate per expert over all tokens, detached, for logging.
    """

    tokens: Tensor
    gates: Tensor
    aux_loss: Tensor
    gate_mean: Tensor


@dataclasses.dataclass(frozen=True)
class NoisyMoEProjectorConfig(ConfigBase):
    """Constructor keywords of :class:`NoisyMoEProjector` (see there)."""

    kind: ClassVar[str] = "noisy_moe_projector"

    in_dim: int = 1024
    out_dim: int = 4096
    num_tokens: int = 576
    num_heads: int | None = None
    noise: str = "learned"
    shared_mlp: bool = True
    balance_loss_coef: float = 0.0
    force_expert: int | None = None
    mode: str = "paper"
    check_finite: bool = False
    attn_backend: str = "auto"

    def __post_init__(self) -> None:
        owner = type(self).__name__
        for name in ("in_dim", "out_dim", "num_tokens"):
            check_int(owner, name, getattr(self, name), minimum=1)
        check_int(owner, "num_heads", self.num_heads, minimum=1, allow_none=True)
        check_choice(owner, "noise", self.noise, NOISES)
        check_bool(owner, "shared_mlp", self.shared_mlp)
        check_number(owner, "balance_loss_coef", self.balance_loss_coef, minimum=0)
        _check_expert("force_expert", self.force_expert, ConfigError, f"{owner}: ")
        check_choice(owner, "mode", self.mode, MODES)
        check_bool(owner, "check_finite", self.check_finite)
        check_choice(owner, "attn_backend", self.attn_backend, ATTN_BACKENDS)
        try:
            grid_side(self.num_tokens, "num_tokens")
        except ValueError as exc:
            raise ConfigError(f"{owner}: {exc}") from None
        heads = default_num_heads(self.in_dim) if self.num_heads is None else self.num_heads
        if self.in_dim % heads:
            raise ConfigError(f"{owner}: num_heads={heads} does not divide dim={self.in_dim} "
                              "(the query expert's width is in_dim)")


def _check_expert(name: str, value: object, error: type[Exception] = ValueError,
                  prefix: str = "") -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                              or value not in (0, 1)):
        raise error(f"{prefix}{name} must be None, 0 (MLP expert) or 1 (query expert), "
                    f"got {value!r}")


class NoisyMoEProjector(ConfigurableMixin, nn.Module):
    """Map global-view vision tokens into the LLM's space through a soft mixture of two experts.

    Args:
        in_dim: vision feature width.
        out_dim: LLM width.
        num_tokens: tokens per view, which is also the query expert's query count (a perfect
            square: the queries carry 2-D positions).
        num_heads: the query expert's heads (``None``: ``max(1, in_dim // 128)``).
        noise: ``"learned"`` (paper) or ``"reference"`` (released rule); independent of ``mode``,
            so a reference-mode model still trains with the paper's noise unless asked.
        shared_mlp: the query expert's output goes through ``mlp`` (True, as released) or through
            its own ``query_mlp``.
        balance_loss_coef: weight ``c`` of the load-balancing loss
            ``c · E · Σ_e P_e²`` with ``P_e`` the mean gate of expert ``e`` over all tokens and
            E = 2: the Switch/ST-MoE ``c · E · Σ_e f_e · P_e`` with soft gates, where the
            dispatched fraction ``f_e`` is ``P_e`` itself. It equals ``c`` when the experts are
            used equally and grows to ``2c`` as one takes everything.
        force_expert: ``None`` (mixture), 0 (MLP only) or 1 (query expert only); only that
            expert is computed. ``forward(force_expert=...)`` overrides it for one call.
        mode: ``"paper"`` or ``"reference"`` (module docstring).
        check_finite: check in ``forward`` that ``x`` is finite (one device sync).
        attn_backend: the query expert's attention backend (``query_expert.attn_backend``).
        device, dtype: where and in which dtype parameters are created (``"meta"`` works).

    Raises:
        ConfigError: (a ``ValueError``) an argument is out of range or unknown, or
            ``num_tokens`` is not a square (see :class:`NoisyMoEProjectorConfig`).
    """

    config_class = NoisyMoEProjectorConfig

    def __init__(
        self,
        *,
        in_dim: int = 1024,
        out_dim: int = 4096,
        num_tokens: int = 576,
        num_heads: int | None = None,
        noise: str = "learned",
        shared_mlp: bool = True,
        balance_loss_coef: float = 0.0,
        force_expert: int | None = None,
        mode: str = "paper",
        check_finite: bool = False,
        attn_backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.config = NoisyMoEProjectorConfig(
            in_dim=in_dim, out_dim=out_dim, num_tokens=num_tokens, num_heads=num_heads,
            noise=noise, shared_mlp=shared_mlp, balance_loss_coef=balance_loss_coef,
            force_expert=force_expert, mode=mode, check_finite=check_finite,
            attn_backend=attn_backend,
        )
        cfg = self.config
        # exact either way; tests flip it to compare the one-W2 path with two W2 products
        self.fuse_w2 = True

        fk = {"device": device, "dtype": dtype}
        self.mlp = mlp(cfg.in_dim, cfg.out_dim, **fk)
        self.query_expert = QueryCompressor(
            dim=cfg.in_dim, num_queries=cfg.num_tokens, num_heads=cfg.num_heads, mode=cfg.mode,
            attn_backend=cfg.attn_backend, **fk,
        )
        self.query_mlp = None if cfg.shared_mlp else mlp(cfg.in_dim, cfg.out_dim, **fk)
        self.w_gate = nn.Parameter(torch.zeros(cfg.in_dim, NUM_EXPERTS, **fk))
        self.w_noise = nn.Parameter(torch.zeros(cfg.in_dim, NUM_EXPERTS, **fk))
        if cfg.mode == "reference":
            self.register_buffer("mean", torch.zeros(1, **fk))
            self.register_buffer("std", torch.ones(1, **fk))

    # ---- settings, read from the config (what is saved is what runs) ----------------------

    in_dim = config_field("in_dim", "Vision feature width.")
    out_dim = config_field("out_dim", "LLM width.")
    num_tokens = config_field("num_tokens", "Tokens per view.")
    noise = config_field("noise", '"learned" or "reference".')
    mode = config_field("mode", '"paper" or "reference".')
    shared_mlp = config_field("shared_mlp", "Whether the query expert's output goes through mlp.")
    force_expert = config_setting("force_expert", "None (mixture), 0 or 1.")
    balance_loss_coef = config_setting("balance_loss_coef", "Weight of the balancing loss.")
    check_finite = config_setting("check_finite", "Whether ``forward`` checks its input.")

    @property
    def attn_backend(self) -> str:
        """The query expert's attention backend; setting it updates both modules' configs."""
        return self.config.attn_backend

    @attn_backend.setter
    def attn_backend(self, value: str) -> None:
        self.config = self.config.replace(attn_backend=value)
        self.query_expert.attn_backend = value

    def roles(self) -> dict[str, RoleSpec]:
        """The paper's roles inside the projector, covering every parameter exactly once:
        ``mlp_expert`` (``mlp``), ``query_expert`` (``query_expert`` and, when not shared,
        ``query_mlp``) and ``gate`` (``w_gate``, ``w_noise``)."""
        return {
            "mlp_expert": RoleSpec(self, ("mlp",)),
            "query_expert": RoleSpec(self, ("query_expert", "query_mlp")),
            "gate": RoleSpec(self, ("w_gate", "w_noise")),
        }

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Re-initialise: default Linear init for the MLPs, the query expert's own rule, zero
        gate and noise weights (so training starts at G = (0.5, 0.5))."""
        for mlp in (self.mlp, self.query_mlp):
            if mlp is not None:
                mlp[0].reset_parameters()
                mlp[2].reset_parameters()
        self.query_expert.reset_parameters()
        nn.init.zeros_(self.w_gate)
        nn.init.zeros_(self.w_noise)
        if self.mode == "reference":
            self.mean.fill_(0.0)
            self.std.fill_(1.0)

    def extra_repr(self) -> str:
        return (f"in_dim={self.in_dim}, out_dim={self.out_dim}, num_tokens={self.num_tokens}, "
                f"noise={self.noise!r}, mode={self.mode!r}, shared_mlp={self.shared_mlp}")

    # ----------------------------------------------------------------------------------------

    def gate(self, x: Tensor, *, noise_sample: Tensor | None = None) -> Tensor:
        """``(b, s, 2)`` float32 (float64 for float64 input) gate weights for ``x`` (b, s, e).

        Noise is added only in training mode: ``noise_sample`` (b, s, 2) when given, else a
        fresh N(0, 1) draw. Autocast is switched off so that the logits, the softplus and the
        softmax run in float32 whatever the surrounding precision.
        """
        work = torch.promote_types(x.dtype, torch.float32)
        ctx = (torch.autocast(x.device.type, enabled=False)
               if torch.amp.is_autocast_available(x.device.type) else contextlib.nullcontext())
        with ctx:
            xf = x.to(work)
            logits = xf @ self.w_gate.to(work)  # (b, s, x)
            if self.training:
                eps = (torch.randn_like(logits) if noise_sample is None
                       else noise_sample.to(device=logits.device, dtype=work))
                if self.noise == "learned":
                    scale = F.softplus(xf @ self.w_noise.to(work))
                else:
                    scale = F.softplus(logits) + REFERENCE_NOISE_FLOOR
                logits = logits + eps * scale
            gates = torch.softmax(logits, dim=-1)
            if self.mode == "reference":
                gates = gates / (gates.sum(-1, keepdim=True) + REFERENCE_GATE_EPS)
        return gates

    def _validate(self, x: Tensor, force_expert: object, noise_sample: Tensor | None) -> None:
        if not isinstance(x, Tensor):
            raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 3:
            raise ValueError(f"x must have rank 3 (views, tokens, in_dim={self.in_dim}), "
                             f"got shape {tuple(x.shape)}")
        if x.shape[-1] != self.in_dim:
            raise ValueError(f"x has feature width {x.shape[-1]}, expected in_dim={self.in_dim}")
        if x.shape[1] != self.num_tokens:
            raise ValueError(
                f"x has {x.shape[1]} tokens per view, expected num_tokens={self.num_tokens} "
                "(the query expert returns one token per query; project other token counts "
                "with projector.mlp)"
            )
        if not x.dtype.is_floating_point:
            raise ValueError(f"x must be floating point, got {x.dtype}")
        _check_expert("force_expert", force_expert)
        if noise_sample is not None and (
            not isinstance(noise_sample, Tensor)
            or tuple(noise_sample.shape) != (*x.shape[:2], NUM_EXPERTS)
        ):
            shape = tuple(noise_sample.shape) if isinstance(noise_sample, Tensor) else noise_sample
            raise ValueError(f"noise_sample must be a tensor of shape "
                             f"{(*x.shape[:2], NUM_EXPERTS)}, got {shape!r}")

    def _one_hot(self, x: Tensor, expert: int) -> tuple[Tensor, Tensor]:
        work = torch.promote_types(x.dtype, torch.float32)
        gm = torch.zeros(NUM_EXPERTS, device=x.device, dtype=work)
        gm[expert] = 1.0
        return gm.expand(*x.shape[:2], NUM_EXPERTS), gm

    def forward(
        self,
        x: Tensor,
        *,
        force_expert: int | None = None,
        noise_sample: Tensor | None = None,
    ) -> MoEOutput:
        """Project ``x`` (b, s, in_dim) with the gated mixture.

        Args:
            x: global-view features, ``s == num_tokens``.
            force_expert: overrides the constructor's ``force_expert`` for this call (``None``
                keeps it); a forced expert is the only one computed.
            noise_sample: fixed ε ``(b, s, 2)`` for the training-mode gate noise (tests);
                ignored in eval mode.

        Returns:
            :class:`MoEOutput` ``(tokens (b, s, out_dim), gates (b, s, 2) float32 (float64 for
            float64 input), aux_loss scalar, gate_mean (2,))``.

        Raises:
            ValueError: wrong type, rank, width or token count of ``x``; bad ``force_expert``
                or ``noise_sample``; non-finite ``x`` with ``check_finite``.
        """
        self._validate(x, force_expert, noise_sample)
        weight = self.w_gate
        if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise ValueError(f"{type(self).__name__}: x is {x.dtype} but the module's weights are "
                             f"{weight.dtype}; cast one to the other or run under torch.autocast")
        expert = self.force_expert if force_expert is None else force_expert
        if self.check_finite and not bool(torch.isfinite(x).all()):
            raise ValueError("x holds NaN or inf (check_finite=True)")
        zero = torch.zeros((), device=x.device, dtype=torch.promote_types(x.dtype, torch.float32))
        q_mlp = self.mlp if self.query_mlp is None else self.query_mlp

        if expert == 0:
            gates, gm = self._one_hot(x, 0)
            return MoEOutput(self.mlp(x), gates, zero, gm)
        if expert == 1:
            gates, gm = self._one_hot(x, 1)
            return MoEOutput(q_mlp(self.query_expert(x)), gates, zero, gm)

        gates = self.gate(x, noise_sample=noise_sample)  # (b, s, x)
        q = self.query_expert(x)  # (b, s, e)
        if self.query_mlp is None and self.fuse_w2:
            b = x.shape[0]
            h = self.mlp[1](self.mlp[0](torch.cat([x, q.to(x.dtype)])))  # (2b, s, o) one W1 GEMM
            h_m, h_q = h[:b], h[b:]
            total = gates.sum(-1, keepdim=True)  # 1 in paper mode, 1/(1+1e-6) in reference mode
            g = (gates / total).to(h.dtype) if self.mode == "reference" else gates.to(h.dtype)
            tokens = self.mlp[2](g[..., :1] * h_m + g[..., 1:] * h_q)
            if self.mode == "reference":
                tokens = tokens * total.to(tokens.dtype)
        else:
            f_m, f_q = self.mlp(x), q_mlp(q)
            g = gates.to(f_m.dtype)
            tokens = g[..., :1] * f_m + g[..., 1:] * f_q

        gate_mean = gates.mean(dim=(0, 1))  # (x,)
        aux = (self.balance_loss_coef * NUM_EXPERTS * (gate_mean * gate_mean).sum()
               if self.balance_loss_coef > 0 else zero)
        return MoEOutput(tokens, gates, aux, gate_mean.detach())
