"""SAELens's inference forward pass as a dictbench module (``SAELensSAE``), its
architectures and tensor names, and the hook-name mapping between the two projects.
Kept apart from the folder conversion in ``saelens`` (which re-exports these names)."""

from __future__ import annotations

import re

import torch
from torch import nn

from dictbench.errors import UserError

ARCHITECTURES = ("standard", "gated", "topk", "jumprelu")
_TL_HOOK = re.compile(r"^blocks\.(\d+)\.hook_resid_(pre|post)$")
_OUR_HOOK = re.compile(r"^resid_(pre|post)\.(\d+)$")


# --- hook names ---------------------------------------------------------------------------


def to_tl_hook(hook: str) -> tuple[str, int]:
    """Our hook name as TransformerLens's (SAELens's) name and layer index."""
    m = _OUR_HOOK.match(hook)
    if not m:
        raise UserError(f"hook '{hook}' has no SAELens name (expected resid_pre.L or resid_post.L)")
    return f"blocks.{m.group(2)}.hook_resid_{m.group(1)}", int(m.group(2))


def from_tl_hook(name: str | None) -> str | None:
    """TransformerLens's residual-stream hook names in our spelling; None for any other."""
    m = _TL_HOOK.match(name or "")
    return f"resid_{m.group(2)}.{m.group(1)}" if m else None


def stream_position(hook: str) -> int | None:
    """Layers applied before the hook, so that resid_post.L and resid_pre.L+1 compare equal."""
    m = _OUR_HOOK.match(hook)
    if not m:
        return None
    layer = int(m.group(2))
    return layer + 1 if m.group(1) == "post" else layer


# --- the SAELens forward pass ---------------------------------------------------------------


_SHAPES = {
    "W_enc": ("d_in", "d_sae"),
    "W_dec": ("d_sae", "d_in"),
    "b_enc": ("d_sae",),
    "b_dec": ("d_in",),
    "b_gate": ("d_sae",),
    "b_mag": ("d_sae",),
    "r_mag": ("d_sae",),
    "threshold": ("d_sae",),
}
TENSORS = {
    "standard": ("W_enc", "b_enc", "W_dec", "b_dec"),
    "topk": ("W_enc", "b_enc", "W_dec", "b_dec"),
    "jumprelu": ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"),
    "gated": ("W_enc", "b_gate", "b_mag", "r_mag", "W_dec", "b_dec"),
}


class SAELensSAE(nn.Module):
    """An SAE computing SAELens's inference forward pass (float32, dictbench's interface).

    - standard: f = ReLU(x' W_enc + b_enc)
    - topk:     f = scatter of ReLU(top-k of x' W_enc + b_enc)
    - jumprelu: f = ReLU(pre) * 1[pre > ReLU(threshold)], pre = x' W_enc + b_enc
    - gated:    f = 1[x' W_enc + b_gate > 0] * ReLU(x' (W_enc * exp(r_mag)) + b_mag)

    with x' = x - b_dec when ``apply_b_dec_to_input``, else x; x_hat = f W_dec + b_dec.
    JumpReLU's ReLU on the threshold is SAELens 6's; SAELens 5 compares with the raw
    threshold, which gives the same f because a negative threshold only admits
    pre-activations that the ReLU then zeroes. TopK's ``rescale_acts_by_decoder_norm``
    (SAELens 6) and the SAELens 5 ``finetuning_scaling_factor`` are applied as there.
    """

    def __init__(
        self,
        architecture: str,
        d_in: int,
        d_sae: int,
        apply_b_dec_to_input: bool = True,
        k: int | None = None,
        rescale_acts_by_decoder_norm: bool = False,
    ):
        super().__init__()
        if architecture not in ARCHITECTURES:
            raise UserError(f"unknown SAELens architecture '{architecture}'")
        if architecture == "topk" and (k is None or k < 1):
            raise UserError("a topk SAE needs k >= 1")
        self.architecture = architecture
        self.apply_b_dec_to_input = bool(apply_b_dec_to_input)
        self.k = k
        self.rescale_acts_by_decoder_norm = bool(rescale_acts_by_decoder_norm)
        dims = {"d_in": d_in, "d_sae": d_sae}
        for name in TENSORS[architecture]:
            shape = tuple(dims[d] for d in _SHAPES[name])
            setattr(self, name, nn.Parameter(torch.zeros(shape), requires_grad=False))
        # SAELens 5's optional per-latent scale on f before decoding; None when unused.
        self.register_buffer("finetuning_scaling_factor", None)

    def _sae_in(self, x: torch.Tensor) -> torch.Tensor:
        return x - self.b_dec if self.apply_b_dec_to_input else x

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        x = self._sae_in(x.float())
        if self.architecture == "gated":
            gate = (x @ self.W_enc + self.b_gate) > 0
            mag = x @ (self.W_enc * self.r_mag.exp()) + self.b_mag
            return gate.to(mag.dtype) * torch.relu(mag)
        pre = x @ self.W_enc + self.b_enc
        if self.architecture == "standard":
            return torch.relu(pre)
        if self.architecture == "jumprelu":
            return torch.relu(pre) * (pre > torch.relu(self.threshold)).to(pre.dtype)
        if self.rescale_acts_by_decoder_norm:
            pre = pre * self.W_dec.norm(dim=-1)
        vals, idx = pre.topk(min(int(self.k or 0), pre.shape[-1]), dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter(-1, idx, torch.relu(vals))

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        if self.finetuning_scaling_factor is not None:
            f = f * self.finetuning_scaling_factor
        if self.architecture == "topk" and self.rescale_acts_by_decoder_norm:
            f = f * (1 / self.W_dec.norm(dim=-1))
        return f @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    def state_for_saelens(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name).detach() for name in TENSORS[self.architecture]}
