"""Building blocks shared by the Mistral-family models.

Numerics follow transformers 5.x op for op where it matters for equality:
RMSNorm in float32 then cast back before the weight multiply, rotary cos/sin
computed in float32 from ``positions * inv_freq`` and cast to the activation
dtype, rotary frequencies (default / linear / llama3 / YaRN) computed exactly
as ``transformers.modeling_rope_utils`` does.

Shape letters: T tokens, H heads, D head dim, R rotary dim, E experts, I
intermediate size, K experts per token.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.checkpoint.files import ModelLoadError
from engine.config import ParallelConfig
from kernels.backend import ExpertWeights, LinearKernel, MoEBackend
from kernels.linear.formats import QuantizedWeight
from kernels.metadata import AttentionMetadata
from kernels.norm import rms

# --------------------------------------------------------------------------- basic modules


class PreparedLinear:
    """A linear's weight in the form its kernel runs (packed dense, or weight-only quantized:
    ``kernels.linear``) and that kernel; the bias stays in the model's dtype."""

    def __init__(self, kernel: LinearKernel, weight: Tensor | QuantizedWeight, bias: Tensor | None):
        self.kernel, self.bias = kernel, bias
        self.scheme = weight.scheme if isinstance(weight, QuantizedWeight) else "none"
        self.form = kernel.prepare(weight)

    def __call__(self, x: Tensor) -> Tensor:  # [..., in] -> [..., out]
        return self.kernel.linear(x, self.form, self.bias)

    def silu_and_mul(self, x: Tensor) -> Tensor:  # [..., in] -> [..., out / 2]
        return self.kernel.silu_and_mul(x, self.form, self.bias)


# What ``model.quantization`` may do to a linear: any scheme, int8 at most, or nothing (a model that
# reads the weight itself, a part of a fused linear, a router whose choices should not move). A linear
# marked "none" is not handed to a kernel at all: it runs ``F.linear`` on the weight as loaded.
QUANTIZE_ANY, QUANTIZE_INT8, QUANTIZE_NONE = "any", "int8", "none"


class Linear(nn.Module):
    """``y = x @ W.T (+ b)`` whose parameters are left uninitialized (load_weights fills them)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False) if bias else None
        self.quantize_as = QUANTIZE_ANY
        self.prepared: PreparedLinear | None = None

    def forward(self, x: Tensor) -> Tensor:  # [..., in] -> [..., out]
        if self.prepared is not None:
            return self.prepared(x)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        quantized = f", {self.prepared.scheme}" if self.prepared is not None and self.prepared.scheme != "none" else ""
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}{quantized}"


class FusedLinear:
    """Several ``Linear`` s over the same input as one matmul. Not a module: the parts own the
    parameters (their weights are views of this one), so they keep their Hugging Face names for
    loading and no weight is stored twice."""

    def __init__(self, weight: Tensor, bias: Tensor | None):
        self.weight, self.bias = weight, bias  # [sum(out), in], [sum(out)]
        self.quantize_as = QUANTIZE_ANY
        self.prepared: PreparedLinear | None = None

    def __call__(self, x: Tensor) -> Tensor:  # [..., in] -> [..., sum(out)]
        if self.prepared is not None:
            return self.prepared(x)
        return F.linear(x, self.weight, self.bias)

    def silu_and_mul(self, x: Tensor) -> Tensor:  # [..., in] -> [..., out / 2]
        """For a fused [gate; up]: silu(gate) * up, in the kernel's matmul where it folds them in."""
        if self.prepared is not None:
            return self.prepared.silu_and_mul(x)
        gate, up = F.linear(x, self.weight, self.bias).chunk(2, dim=-1)  # [..., I] each
        return F.silu(gate) * up


def fuse_linears(*parts: Linear) -> FusedLinear:
    """One ``FusedLinear`` ``[sum(out), in]`` for several ``Linear`` s over the same input.

    Each part's parameters become views of its row block of the fused tensors
    (``param.copy_`` at load writes through to the fused weight). The fused matmul gives the
    parts' outputs side by side: every output element is the same dot product as in the
    separate matmul (the equality tests against transformers hold bit for bit).
    """
    in_features = parts[0].in_features
    assert all(p.in_features == in_features for p in parts), [p.in_features for p in parts]
    weight = torch.cat([p.weight.data for p in parts])  # [sum(out), in]
    has_bias = parts[0].bias is not None
    bias = torch.cat([p.bias.data for p in parts]) if has_bias else None  # [sum(out)]
    lo = 0
    for p in parts:
        hi = lo + p.out_features
        p.weight = nn.Parameter(weight[lo:hi], requires_grad=False)
        if has_bias:
            p.bias = nn.Parameter(bias[lo:hi], requires_grad=False)
        p.quantize_as = QUANTIZE_NONE  # the fused linear runs instead of the part
        lo = hi
    return FusedLinear(weight, bias)


class Embedding(nn.Module):
    def __init__(self, num_embeddings: int, dim: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_embeddings, dim, dtype=dtype), requires_grad=False)

    def forward(self, ids: Tensor) -> Tensor:  # [T] -> [T, dim]
        return F.embedding(ids, self.weight)


class RMSNorm(nn.Module):
    """``weight * (x / rms(x))``: normalization in float32, cast back before the weight multiply."""

    def __init__(self, dim: int, eps: float = 1e-6, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim, dtype=dtype), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:  # [..., dim]
        in_dtype = x.dtype
        if rms.fits(x, self.weight):  # one C call for PyTorch's six ops (same float32 math)
            return rms.rms_norm(x, self.weight, self.eps)
        if in_dtype == torch.float32 == self.weight.dtype:  # one fused op for the steps below (same float32 math)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        x32 = x.to(torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(in_dtype)

    def add(self, x: Tensor, residual: Tensor) -> tuple[Tensor, Tensor]:  # [..., dim] each
        """(residual + x, its norm): in one C call where ``kernels.norm.rms`` takes them."""
        if rms.fits(x, self.weight) and residual.dtype == x.dtype:
            return rms.add_rms_norm(x, residual, self.weight, self.eps)
        total = residual + x
        return total, self(total)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


def check_activation(hidden_act: str) -> None:
    if hidden_act != "silu":
        raise ValueError(f"hidden_act={hidden_act!r} is not supported (only 'silu')")


class GatedMLP(nn.Module):
    """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, hidden: int, intermediate: int, bias: bool = False, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.gate_proj = Linear(hidden, intermediate, bias, dtype)
        self.up_proj = Linear(hidden, intermediate, bias, dtype)
        self.down_proj = Linear(intermediate, hidden, bias, dtype)
        # gate and up in one matmul; gate_proj / up_proj stay the loadable parameters (views)
        self.gate_up = fuse_linears(self.gate_proj, self.up_proj)  # [2I, hidden]

    def forward(self, x: Tensor) -> Tensor:  # [T, hidden] -> [T, hidden]
        return self.down_proj(self.gate_up.silu_and_mul(x))  # silu(gate) * up: [T, I]


# --------------------------------------------------------------------------- rotary embeddings

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def standardize_rope_parameters(hf: dict, default_theta: float = 10000.0) -> dict:
    """The config's RoPE parameters in transformers 5's standardized form.

    Mirrors ``RotaryEmbeddingConfigMixin``: a legacy ``rope_scaling`` dict wins
    over ``rope_parameters``; ``rope_theta`` / ``partial_rotary_factor`` at the
    top level are defaults; ``type`` is the legacy name of ``rope_type``; the
    scaled types get ``original_max_position_embeddings`` (top-level value
    first, else ``max_position_embeddings``).
    """
    params = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
    params.setdefault("rope_theta", hf.get("rope_theta", default_theta))
    if hf.get("partial_rotary_factor") is not None:
        params.setdefault("partial_rotary_factor", hf["partial_rotary_factor"])
    params.setdefault("rope_type", params.get("type", "default"))
    if params["rope_type"] in ("llama3", "yarn", "longrope"):
        if "original_max_position_embeddings" in hf:
            params["original_max_position_embeddings"] = hf["original_max_position_embeddings"]
        else:
            params.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings"))
    return params


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN magnitude correction ``0.1 * mscale * ln(scale) + 1`` (1 for scale <= 1)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def _yarn_inv_freq(params: dict, dim: int, max_position_embeddings: int) -> tuple[Tensor, float]:
    base = params["rope_theta"]
    factor = params.get("factor")
    original_max = params["original_max_position_embeddings"]
    if factor is None:
        factor = max_position_embeddings / original_max
    attention_factor = params.get("attention_factor")
    mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = float(yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim))
        else:
            attention_factor = yarn_get_mscale(factor)
    beta_fast = params.get("beta_fast") or 32
    beta_slow = params.get("beta_slow") or 1

    def correction_dim(num_rotations: float) -> float:
        # the dimension index whose wavelength makes ``num_rotations`` turns over the original context
        return (dim * math.log(original_max / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp

    pos_freqs = base ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)  # [R/2]
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (factor * pos_freqs)
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation_weight = 1 - ramp  # 1: keep the original frequency, 0: fully interpolated
    inv_freq = interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight
    return inv_freq, float(attention_factor)


def _llama3_inv_freq(params: dict, dim: int) -> Tensor:
    base = params["rope_theta"]
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim))
    factor = params["factor"]
    low_freq_factor, high_freq_factor = params["low_freq_factor"], params["high_freq_factor"]
    old_context = params["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_context / low_freq_factor, old_context / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding:
    """RoPE tables for one model (not an ``nn.Module``: nothing to load, and the
    frequencies must stay float32 whatever the model dtype).

    ``head_dim`` is the config's head dim that transformers' formulas start from;
    scaled types rotate ``int(head_dim * partial_rotary_factor)`` dims, the
    default type ``default_dim`` (transformers uses the full head dim there).
    """

    def __init__(
        self,
        params: dict,
        head_dim: int,
        max_position_embeddings: int,
        interleaved: bool = False,
        default_dim: int | None = None,
    ):
        self.params = params
        self.rope_type = params["rope_type"]
        self.interleaved = interleaved
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"rope_type={self.rope_type!r} is not supported (supported: {SUPPORTED_ROPE_TYPES})")
        with torch.device("cpu"):  # frequencies on the host, as transformers computes them; moved once in cos_sin
            self._init_frequencies(params, head_dim, max_position_embeddings, default_dim)

    def _init_frequencies(
        self, params: dict, head_dim: int, max_position_embeddings: int, default_dim: int | None
    ) -> None:
        base = params["rope_theta"]
        if self.rope_type == "default":
            dim = default_dim or head_dim
            self.inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))  # [R/2]
            self.attention_scaling = 1.0
        else:
            dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
            if self.rope_type == "linear":
                inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim))
                self.inv_freq, self.attention_scaling = inv / params["factor"], 1.0
            elif self.rope_type == "llama3":
                self.inv_freq, self.attention_scaling = _llama3_inv_freq(params, dim), 1.0
            else:
                self.inv_freq, self.attention_scaling = _yarn_inv_freq(params, dim, max_position_embeddings)
        self.rotary_dim = dim

    def cos_sin(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """positions [T] -> the step's rotation tables in ``dtype`` (attention scaling folded in), in the
        form ``apply`` reads them, built once per step for every layer: [T, 1, R] cos and, with the sign
        of rotate_half folded in, sin (non-interleaved); [T, 1, R/2] cos and sin (interleaved)."""
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)  # [R/2], once: later steps find it there
        freqs = positions[:, None].float() * self.inv_freq[None, :]  # [T, R/2]
        cos = freqs.cos() * self.attention_scaling  # [T, R/2]
        sin = freqs.sin() * self.attention_scaling
        if not self.interleaved:
            cos, sin = torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)  # [T, R]
        return cos.to(dtype)[:, None, :], sin.to(dtype)[:, None, :]

    def apply(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """Rotate x [T, H, R] by the tables of ``cos_sin``.

        Non-interleaved: halves ``(x[:R/2], x[R/2:])`` are the pairs: ``x * cos + rotate_half(x) * sin``,
        where ``rotate_half(x) = (-x2, x1)``; the sign rides on the table, so the swap of halves is one roll
        (a negation is exact: the same values as transformers' formula).
        Interleaved (DeepSeek / Mistral 4 weights): ``(x[0::2], x[1::2])`` are the
        pairs, and the result comes out de-interleaved ``[rotated evens, rotated odds]``
        as in transformers -- queries and keys get the same layout, so their dot
        products are those of the interleaved rotation.
        """
        if self.interleaved:
            x1, x2 = x[..., 0::2], x[..., 1::2]  # [T, H, R/2]
            return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
        return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin  # [T, H, R]


def llama4_query_scale(positions: Tensor, beta: float, original_max_position_embeddings: int) -> Tensor:
    """Mistral 4's position-dependent query scale ``1 + beta * ln(1 + floor(p / original_max))``: [T] float32."""
    return 1 + beta * torch.log(1 + torch.floor(positions / original_max_position_embeddings))


# --------------------------------------------------------------------------- per-step context


@dataclass
class StepContext:
    """What every layer needs about this step, computed once per forward."""

    meta: AttentionMetadata
    positions: Tensor  # [T] int64
    cos: Tensor  # [T, 1, R] (interleaved: [T, 1, R/2]): RotaryEmbedding.cos_sin's tables
    sin: Tensor
    query_scale: Tensor | None = None  # [T, 1, 1] in the activation dtype (Mistral 4)


class DecoderLayer(nn.Module):
    """Pre-norm residual block: ``h += attn(norm(h)); h += mlp(norm(h))``."""

    def __init__(self, self_attn: nn.Module, mlp: nn.Module, hidden: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.self_attn = self_attn
        self.mlp = mlp
        self.input_layernorm = RMSNorm(hidden, eps, dtype)
        self.post_attention_layernorm = RMSNorm(hidden, eps, dtype)

    def forward(self, h: Tensor, ctx: StepContext, kv_cache: tuple[Tensor, ...]) -> Tensor:  # [T, hidden]
        h, normed = self.post_attention_layernorm.add(self.self_attn(self.input_layernorm(h), ctx, kv_cache), h)
        return h + self.mlp(normed)


# --------------------------------------------------------------------------- routed experts (MoE)

# Checkpoint layouts of routed experts, relative to ``...mlp.experts.``:
#   gate_up_proj [E, 2I, D] (gate rows then up rows), down_proj [E, D, I]    -- transformers 5 fused
#   {e}.w1.weight [I, D] gate, {e}.w3.weight [I, D] up, {e}.w2.weight [D, I]  -- Mixtral original
#   {e}.gate_proj.weight, {e}.up_proj.weight, {e}.down_proj.weight            -- DeepSeek / Qwen-MoE style
_PER_EXPERT = re.compile(r"(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight")
_PART_OF = {"w1": "gate", "gate_proj": "gate", "w3": "up", "up_proj": "up", "w2": "down", "down_proj": "down"}


def expert_slice(num_experts: int, parallel: ParallelConfig) -> tuple[int, int]:
    """[start, end) of the routed experts this expert-parallel rank owns."""
    if num_experts % parallel.ep_size != 0:
        raise ValueError(f"{num_experts} routed experts cannot be split evenly over ep_size={parallel.ep_size}")
    per_rank = num_experts // parallel.ep_size
    return parallel.ep_rank * per_rank, (parallel.ep_rank + 1) * per_rank


class RoutedExperts(nn.Module):
    """This rank's routed experts: ``gate_up_proj [E_local, 2I, D]``, ``down_proj [E_local, D, I]``
    for global experts ``[expert_start, expert_start + E_local)``."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int, dtype: torch.dtype, parallel: ParallelConfig):
        super().__init__()
        self.num_experts = num_experts
        self.intermediate = intermediate
        self.expert_start, self.expert_end = expert_slice(num_experts, parallel)
        local = self.expert_end - self.expert_start
        self.gate_up_proj = nn.Parameter(torch.empty(local, 2 * intermediate, hidden, dtype=dtype), requires_grad=False)
        self.down_proj = nn.Parameter(torch.empty(local, hidden, intermediate, dtype=dtype), requires_grad=False)
        self._loaded: set[tuple[int, str]] = set()  # (global expert, "gate" | "up" | "down")
        self.prepared: ExpertWeights | None = None  # the MoE backend's form, made after load (prepare.py)

    @property
    def num_local_experts(self) -> int:
        return self.expert_end - self.expert_start

    def wants(self, rel_name: str) -> bool:
        """False for a per-expert tensor of another rank's expert."""
        m = _PER_EXPERT.fullmatch(rel_name)
        return m is None or self.expert_start <= int(m.group(1)) < self.expert_end

    def _rows(self, part: str) -> tuple[Tensor, tuple[int, ...]]:
        """(destination view [E_local, ...], expected per-expert shape) of a part."""
        i = self.intermediate
        if part == "gate":
            dst = self.gate_up_proj[:, :i]
        elif part == "up":
            dst = self.gate_up_proj[:, i:]
        else:
            dst = self.down_proj
        return dst, tuple(dst.shape[1:])

    def load(self, rel_name: str, tensor: Tensor, full_name: str) -> None:
        """Copy one checkpoint tensor named ``...experts.<rel_name>`` into this rank's slice."""
        lo, hi = self.expert_start, self.expert_end
        if rel_name in ("gate_up_proj", "down_proj"):
            parts = ("gate", "up") if rel_name == "gate_up_proj" else ("down",)
            full = self.gate_up_proj if rel_name == "gate_up_proj" else self.down_proj
            expected = (self.num_experts, *full.shape[1:])
            if tuple(tensor.shape) != expected:
                raise ModelLoadError(f"tensor {full_name!r} has shape {tuple(tensor.shape)}, expected {expected}")
            full.data.copy_(tensor[lo:hi])
            self._loaded.update((e, p) for e in range(lo, hi) for p in parts)
            return
        m = _PER_EXPERT.fullmatch(rel_name)
        if m is None:
            raise ModelLoadError(f"unexpected tensor {full_name!r} in checkpoint")
        e, part = int(m.group(1)), _PART_OF[m.group(2)]
        if not 0 <= e < self.num_experts:
            raise ModelLoadError(f"tensor {full_name!r} names expert {e}, but the model has {self.num_experts}")
        if not lo <= e < hi:
            return  # another rank's expert
        dst, expected = self._rows(part)
        if tuple(tensor.shape) != expected:
            raise ModelLoadError(f"tensor {full_name!r} has shape {tuple(tensor.shape)}, expected {expected}")
        dst[e - lo].copy_(tensor)
        self._loaded.add((e, part))

    def missing(self) -> list[str]:
        """Human-readable descriptions of the local expert weights not loaded yet."""
        names = {"gate": "w1/gate_proj", "up": "w3/up_proj", "down": "w2/down_proj"}
        return [
            f"expert {e} {names[p]}"
            for e in range(self.expert_start, self.expert_end)
            for p in ("gate", "up", "down")
            if (e, p) not in self._loaded
        ]


def identity(t: Tensor) -> Tensor:
    return t


class RoutedMoE(nn.Module):
    """Router + routed experts (+ optional always-on shared expert).

    Expert parallelism: each rank holds ``E / ep_size`` routed experts, and
    ``fused_moe`` returns this rank's *partial* routed sum. ``self.combine``
    (identity by default; a distributed runner plugs in an all-reduce) turns
    the partials into the full routed sum on every rank. The shared expert is
    replicated: every rank adds it *after* combine, so it is counted once and
    all ranks end the layer with the same hidden state:
    ``out = combine(routed_partial) + shared(x)``.
    """

    def __init__(
        self,
        hidden: int,
        num_experts: int,
        top_k: int,
        intermediate: int,
        dtype: torch.dtype,
        moe_backend: MoEBackend,
        parallel: ParallelConfig,
        shared_intermediate: int | None = None,
    ):
        super().__init__()
        self.top_k = top_k
        self.gate = Linear(hidden, num_experts, False, dtype)
        self.gate.quantize_as = QUANTIZE_NONE  # routing stays as the checkpoint decides it
        self.experts = RoutedExperts(num_experts, hidden, intermediate, dtype, parallel)
        self.shared_experts = GatedMLP(hidden, shared_intermediate, False, dtype) if shared_intermediate else None
        self.moe_backend = moe_backend
        self.combine: Callable[[Tensor], Tensor] = identity
        # Token-to-expert assignments per expert-parallel rank's slice, for operators (load balance).
        # Routing is replicated, so rank 0's count covers every rank. A buffer, so it follows .to(device);
        # not persistent, so checkpoints never see it.
        self.experts_per_rank = num_experts // parallel.ep_size
        self.register_buffer("rank_load", torch.zeros(parallel.ep_size, dtype=torch.int64), persistent=False)

    def route(self, router_logits: Tensor) -> tuple[Tensor, Tensor]:
        """router_logits [T, E] -> (topk_weights [T, K], topk_ids [T, K] global ids)."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:  # [T, hidden] -> [T, hidden]
        router_logits = self.gate(x)  # [T, E]
        topk_weights, topk_ids = self.route(router_logits)  # [T, K] each
        self.rank_load += torch.bincount(
            topk_ids.reshape(-1) // self.experts_per_rank, minlength=self.rank_load.numel()
        )  # [ep_size]
        experts = self.experts.prepared or ExpertWeights(self.experts.gate_up_proj, self.experts.down_proj)
        routed = self.moe_backend.fused_moe(
            x, topk_ids, topk_weights, experts, self.experts.expert_start
        )  # [T, hidden]
        routed = self.combine(routed)
        if self.shared_experts is not None:
            routed = routed + self.shared_experts(x)
        return routed
