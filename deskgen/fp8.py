"""FP8 linear layers for the SDXL UNet: weights stored in float8 (e4m3), matmuls on FP8 tensor cores.

    from deskgen.fp8 import quantize_unet_linears
    report = quantize_unet_linears(pipe.unet)     # in place; returns what was converted

What is converted: every ``torch.nn.Linear`` inside the UNet's transformer blocks that runs on image
tokens — attention ``to_q``/``to_k``/``to_v``/``to_out.0`` of self-attention, ``to_q``/``to_out.0`` of
cross-attention, the feed-forward projections and ``proj_in``/``proj_out`` — about 80 % of the UNet's
parameters. Left in bf16: the cross-attention ``to_k``/``to_v`` (they read the 77 text tokens: tiny,
and FP8 matmuls want row counts that are multiples of 16), convolutions, norms and the embeddings.

Scaling: weights per output channel (``amax / 448``, e4m3's largest value), activations per row (per
token), computed on the fly; ``torch._scaled_mm`` multiplies in FP8 and writes bf16. Under
``torch.compile`` the activation scaling fuses into one kernel per layer. Weight memory of the
converted layers halves (2 bytes -> 1 byte per parameter, plus one float32 scale per output channel).

LoRA: a layer that peft wrapped (a hot-swap slot) keeps its LoRA branches in bf16; only its base layer
becomes FP8. FP8 base weights cannot take a fused LoRA delta exactly, so FP8 goes with hot-swapped
(unfused) LoRAs only (:class:`deskgen.generator.GeneratorSettings` enforces that). Works on the CPU too
(``torch._scaled_mm`` has a CPU kernel): the unit tests run this exact path on the tiny UNet.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

#: e4m3's largest finite value.
E4M3_MAX = 448.0
#: FP8 matmuls need the reduction and output dimensions to be multiples of 16.
ALIGN = 16
#: Linear layers inside transformer blocks that run on image tokens (module-name suffixes).
_TARGET = re.compile(
    r"(attn1\.to_(q|k|v)|attn1\.to_out\.0|attn2\.to_q|attn2\.to_out\.0|ff\.net\.0\.proj|ff\.net\.2|proj_in|proj_out)$"
)


class Fp8Linear(torch.nn.Module):
    """``y = x @ W.T + b`` with ``W`` in float8_e4m3fn (per-output-channel scale) and ``x`` quantised per
    row on the fly. Input and output in ``out_dtype`` (the model's dtype)."""

    weight_fp8: torch.Tensor
    weight_scale: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype) -> None:
        super().__init__()
        out_features, in_features = weight.shape
        w = weight.detach().float()
        scale = (w.abs().amax(dim=1, keepdim=True) / E4M3_MAX).clamp(min=1e-12)  # (out, 1)
        self.in_features = in_features
        self.out_features = out_features
        self.out_dtype = out_dtype
        # Row-major (out, in) in FP8; _scaled_mm takes its transpose, which is then column-major as required.
        self.register_buffer("weight_fp8", (w / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn))
        self.register_buffer("weight_scale", scale.reshape(1, out_features).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().to(out_dtype))

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear) -> Fp8Linear:
        return cls(linear.weight, linear.bias, linear.weight.dtype)

    def dequantized_weight(self) -> torch.Tensor:
        """The weight this layer actually multiplies by, in float32 (for error checks)."""
        return self.weight_fp8.float() * self.weight_scale.reshape(-1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, self.in_features)
        amax = rows.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12)
        x_scale = amax / E4M3_MAX
        xq = (rows.float() / x_scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
        y = torch._scaled_mm(
            xq, self.weight_fp8.t(), scale_a=x_scale, scale_b=self.weight_scale, out_dtype=self.out_dtype,
            use_fast_accum=x.is_cuda,
        )  # fmt: skip
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8=e4m3, out_dtype={self.out_dtype}"


@dataclass(frozen=True)
class Fp8Report:
    """What :func:`quantize_unet_linears` converted."""

    layers: int
    params: int  # parameters now stored in FP8
    unet_params: int  # all UNet parameters before conversion
    bytes_saved: int

    @property
    def fraction(self) -> float:
        return self.params / self.unet_params if self.unet_params else 0.0


def _eligible(linear: torch.nn.Linear) -> bool:
    return linear.in_features % ALIGN == 0 and linear.out_features % ALIGN == 0


def quantize_unet_linears(unet: Any) -> Fp8Report:
    """Replace the UNet's token linears (see the module docstring) by :class:`Fp8Linear`, in place.

    A peft-wrapped layer (LoRA slot) keeps its wrapper and LoRA branches; its ``base_layer`` is replaced.
    Idempotent: already converted layers are skipped. Call after the LoRA slots are built and before
    ``torch.compile``.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    unet_params = sum(p.numel() for p in unet.parameters())
    layers = params = saved = 0
    for name, module in list(unet.named_modules()):
        if not _TARGET.search(name):
            continue
        if isinstance(module, BaseTunerLayer):
            base = module.get_base_layer()
            if isinstance(base, torch.nn.Linear) and _eligible(base):
                fp8 = Fp8Linear.from_linear(base)
                module.base_layer = fp8  # type: ignore[attr-defined]
            else:
                continue
        elif isinstance(module, torch.nn.Linear) and _eligible(module):
            fp8 = Fp8Linear.from_linear(module)
            parent_name, _, child = name.rpartition(".")
            setattr(unet.get_submodule(parent_name) if parent_name else unet, child, fp8)
        else:
            continue
        n = fp8.in_features * fp8.out_features
        layers += 1
        params += n
        saved += n * (torch.finfo(fp8.out_dtype).bits // 8 - 1) - fp8.out_features * 4
    return Fp8Report(layers=layers, params=params, unet_params=unet_params, bytes_saved=saved)
