"""Gated SAE (Rajamanoharan et al. 2024, arXiv 2404.16014).

The encoder separates *which* latents fire from *how strongly*:

    pi_gate = (x - b_dec) W_enc + b_gate
    pi_mag  = (x - b_dec) (W_enc * exp(r_mag)) + b_mag
    f       = 1[pi_gate > 0] * ReLU(pi_mag),        x_hat = f W_dec + b_dec

The L1 penalty acts only on the gate path, ReLU(pi_gate), so it no longer shrinks
the magnitudes that build x_hat (the shrinkage an L1 SAE shows as a relative
reconstruction bias below 1). The Heaviside passes no gradient, so the gate path is
trained by the sparsity term plus an auxiliary reconstruction of x from
ReLU(pi_gate) through a *stop-gradient copy* of the decoder:

    loss = ||x - x_hat||^2 + lambda * sum_i ReLU(pi_gate)_i ||W_dec,i||
           + ||x - (ReLU(pi_gate) W_dec.detach() + b_dec.detach())||^2

(squared norms summed over dimensions, everything averaged over tokens). The copy
is what makes the auxiliary term a training signal for the *encoder* only; SAELens
passes the live decoder there, so its auxiliary term also pulls W_dec and b_dec
towards reconstructing from the un-gated, shrunken gate activations. As in the paper
and dictionary_learning, the *encoder's* input centring (x - b_dec) uses the live
b_dec, so b_dec still receives gradient from every term through pi_gate/pi_mag,
exactly as it does in an L1 SAE's encoder.

Training (``training_terms``, the one entry point) computes the shared encoder matmul
once, then either a fused dense step (``_dense_terms``) or, when fewer than 5% of gates
open (a trained Gated SAE), every term through the open (token, latent) pairs only
(``_sparse_terms``); both give the values and gradients of the written-out
``loss_terms`` (tests/test_kernel_reference.py).

Parameters use SAELens's Gated names and shapes: W_enc [d_in, d_sae], b_gate,
r_mag, b_mag [d_sae], W_dec [d_sae, d_in], b_dec [d_in].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dictbench.baselines.base import (
    Baseline,
    BaselineConfig,
    LossOutput,
    SAELensExport,
    fold_biases,
    saelens_export_as,
    warmup_factor,
)
from dictbench.baselines.dense_ops import (
    autocast_on,
    centred_encoder,
    gated_dense,
    relu_path_is_sparse,
)
from dictbench.baselines.init import (
    geometric_median,
    project_out_radial_grad,
    renormalise_rows_,
    tied_init,
)
from dictbench.baselines.sparse_ops import Pairs, pairs_decode, pairs_encoder
from dictbench.registry import register_baseline


@dataclass
class GatedConfig(BaselineConfig):
    """Hyperparameters; defaults follow the paper / dictionary_learning where they transfer.

    - ``l1_coefficient`` (lambda): 5.0, the same default as dictbench's ``l1`` baseline.
      With activations rescaled to E||x||^2 = d_in and unit-norm decoder rows, the
      auxiliary term pins ReLU(pi_gate) to the scale of an L1 SAE's latents, so the two
      coefficients act on comparable quantities. dictionary_learning's 0.1 is for raw,
      unnormalised activations and does not transfer; sweep this knob.
    - ``l1_warmup_frac``: linear ramp of lambda over the first 5% of steps, as ``l1``.
    - ``unit_norm_decoder``: the paper trains with unit-norm decoder rows (gradient
      projected onto the sphere, rows renormalised after each step). With it off the
      rows are free and the norm-weighted penalty keeps the sparsity term honest
      (shrinking latents while growing rows would otherwise dodge it).
    - ``adam_beta1, adam_beta2`` = (0.0, 0.999): dictionary_learning's gated trainer.
    - ``lr``: None means the run's budget rate. dictionary_learning uses 5e-5 over
      long budgets; a short dictbench budget needs a larger rate.
    """

    l1_coefficient: float = 5.0
    l1_warmup_frac: float = 0.05
    unit_norm_decoder: bool = True
    adam_beta1: float = 0.0
    adam_beta2: float = 0.999


@register_baseline
class GatedSAE(Baseline):
    name = "gated"
    config_class = GatedConfig
    sparsity_knob = "l1_coefficient"
    # Checked: the loss is a mean over tokens, so a batch split across processes trains
    # exactly as one (bench/train/distributed.py). Not inherited: a subclass checks it again.
    data_parallel_exact = True

    def saelens_export(self) -> SAELensExport:
        """At inference this is SAELens's gated SAE, tensor for tensor."""
        return saelens_export_as("gated", self)

    def __init__(self, cfg: GatedConfig):
        super().__init__(cfg)
        self.cfg: GatedConfig = cfg
        self.W_dec, self.W_enc, _, b_dec = tied_init(cfg.d_in, cfg.d_sae)
        self.b_gate = nn.Parameter(torch.zeros(cfg.d_sae))
        self.r_mag = nn.Parameter(torch.zeros(cfg.d_sae))
        self.b_mag = nn.Parameter(torch.zeros(cfg.d_sae))
        self.b_dec = b_dec  # registered last, as before: the optimiser's parameter order

    # --- encoder pieces --------------------------------------------------------------
    def pre_activations(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pi_gate, pi_mag): the two paths share W_enc, rescaled per latent by exp(r_mag).

        Written as the paper (and SAELens) writes it, so an exported SAE computes the
        same floats in both libraries; training uses :meth:`_shared_pre_activations`."""
        xc = x - self.b_dec
        pi_gate = xc @ self.W_enc + self.b_gate
        pi_mag = xc @ (self.W_enc * self.r_mag.exp()) + self.b_mag
        return pi_gate, pi_mag

    def _shared_pre_activations(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The same values from one matmul: (x - b_dec) (W_enc diag(e^r)) equals
        ((x - b_dec) W_enc) diag(e^r), and the backward sums both paths' gradients
        before its one matmul."""
        shared = centred_encoder(x, self.b_dec, self.W_enc)
        pi_gate = shared + self.b_gate
        pi_mag = torch.addcmul(self.b_mag, shared, self.r_mag.exp())
        return pi_gate, pi_mag

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pi_gate, pi_mag = self.pre_activations(x)
        return (pi_gate > 0).to(pi_mag.dtype) * torch.relu(pi_mag)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.W_dec + self.b_dec

    # --- training ----------------------------------------------------------------------
    def loss_terms(
        self, x: torch.Tensor, one_matmul: bool = True
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The three loss terms with their graphs (unweighted), and the latents f, by
        plain autograd: the plain formula :meth:`training_terms` must equal (with
        ``one_matmul=False``, the two encoder matmuls exactly as the paper writes them),
        and what runs under autocast.

        Separate from :meth:`loss` so each term's gradient can be inspected alone.
        """
        shared = self._shared_pre_activations if one_matmul else self.pre_activations
        pi_gate, pi_mag = shared(x)
        # Multiplying by a 0/1 mask: the Heaviside step sends no gradient to the gate.
        f = (pi_gate > 0).to(pi_mag.dtype) * torch.relu(pi_mag)
        x_hat = torch.addmm(self.b_dec, f, self.W_dec)
        mse = (x_hat - x).pow(2).sum(-1).mean()
        gate = torch.relu(pi_gate)
        row_norms = self.W_dec.norm(dim=-1)
        l1 = (gate * row_norms).sum(-1).mean()
        x_hat_frozen = torch.addmm(self.b_dec.detach(), gate, self.W_dec.detach())
        aux = (x_hat_frozen - x).pow(2).sum(-1).mean()
        return {"mse": mse, "l1": l1, "aux": aux}, f

    def loss(self, batch: torch.Tensor, step: int) -> LossOutput:
        terms, f = self.training_terms(batch)
        warm = warmup_factor(step, int(self.cfg.l1_warmup_frac * self.total_steps))
        total = terms["mse"] + self.cfg.l1_coefficient * warm * terms["l1"] + terms["aux"]
        return LossOutput(total, {k: v.detach() for k, v in terms.items()}, f.detach())

    def training_terms(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The one entry point of the Gated kernels: :meth:`loss_terms`' values and
        gradients from one encoder matmul without a graph, then the fused dense Function
        or, when few gates open, the open pairs only (plain autograd under autocast)."""
        if autocast_on(x):  # the fused Functions assume one dtype throughout
            return self.loss_terms(x)
        with torch.no_grad():  # the one dictionary-sized encoder matmul, looked at first
            shared0 = (x - self.b_dec) @ self.W_enc
            gate0 = torch.relu(shared0 + self.b_gate)
        if relu_path_is_sparse(gate0):
            return self._sparse_terms(x, shared0, gate0)
        return self._dense_terms(x, shared0)

    def _dense_terms(
        self, x: torch.Tensor, shared0: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """:meth:`loss_terms` from the encoder matmul already done, through one fused
        Function (``dense_ops.gated_dense``): same values and gradients, fewer passes."""
        x_hat, penalty, frozen, f = gated_dense(
            shared0,
            x,
            self.b_dec,
            self.W_enc,
            self.b_gate,
            self.r_mag,
            self.b_mag,
            self.W_dec,
            self.W_dec.norm(dim=-1),
        )
        mse = (x_hat - x).pow(2).sum(-1).mean()
        aux = (frozen - x).pow(2).sum(-1).mean()
        return {"mse": mse, "l1": penalty / x.shape[0], "aux": aux}, f

    def _sparse_terms(
        self, x: torch.Tensor, shared0: torch.Tensor, gate0: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """:meth:`loss_terms` through the pairs whose gate is open (a trained Gated SAE
        opens few): every term is zero elsewhere, the Heaviside passes no gradient, so
        the same values and gradients come from those pairs alone."""
        n = x.shape[0]
        pairs, _ = Pairs.of_nonzeros(gate0)
        cols = pairs.cols
        rows = pairs.rows()
        shared = pairs_encoder(pairs, shared0[rows, cols], x, self.b_dec, self.W_enc)
        gate = torch.relu(shared + self.b_gate[cols])
        mag = torch.relu(shared * self.r_mag.exp()[cols] + self.b_mag[cols])
        mse = (pairs_decode(pairs, mag, self.W_dec) + self.b_dec - x).pow(2).sum(-1).mean()
        l1 = (gate * self.W_dec.norm(dim=-1)[cols]).sum() / n
        frozen = pairs_decode(pairs, gate, self.W_dec.detach()) + self.b_dec.detach()
        aux = (frozen - x).pow(2).sum(-1).mean()
        f = torch.zeros_like(gate0)
        f[rows, cols] = mag.detach()
        return {"mse": mse, "l1": l1, "aux": aux}, f

    def on_train_start(self, total_steps: int, sample: torch.Tensor) -> None:
        super().on_train_start(total_steps, sample)
        with torch.no_grad():
            self.b_dec.copy_(geometric_median(sample))

    def before_optimizer_step(self) -> None:
        if self.cfg.unit_norm_decoder:
            project_out_radial_grad(self.W_dec)

    def after_step(self) -> None:
        if self.cfg.unit_norm_decoder:
            renormalise_rows_(self.W_dec)

    def flops_per_token(self) -> float:
        """Four dictionary-sized matmuls per token (gate and magnitude encoders, decoder,
        frozen decoder of the aux term) at the usual 6 FLOPs per weight; the frozen
        decoder's skipped weight gradient makes this a slight overestimate."""
        return 6.0 * 4 * self.cfg.d_in * self.cfg.d_sae

    def fold_input_scale(self, scale: float) -> None:
        # Trained on s x: pi_gate(s x) = s * [(x - b_dec/s) W_enc + b_gate/s], likewise
        # pi_mag. The gate's sign and ReLU are unchanged by the positive factor s, so
        # dividing every bias by s gives latents f/s and reconstruction x_hat/s.
        fold_biases(self, scale, "b_gate", "b_mag", "b_dec")
