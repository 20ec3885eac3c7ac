"""A minimal TopK sparse autoencoder for dictbench: the whole method contract in one file.

Train it with `dictbench run --baseline my_sae:MySAE --set baselines.0.params.k=16`
(with this file's folder on PYTHONPATH).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dictbench.baselines import Baseline, BaselineConfig, LossOutput
from dictbench.baselines.base import SAELensExport, saelens_tensors


@dataclass
class MyConfig(BaselineConfig):
    k: int = 16  # latents kept per token: this method's sparsity knob


class MySAE(Baseline):
    name = "my_topk"
    config_class = MyConfig
    sparsity_knob = "k"
    data_parallel_exact = True  # the loss is a mean over tokens

    def __init__(self, cfg: MyConfig):
        super().__init__(cfg)  # keeps cfg as self.cfg
        w = torch.randn(cfg.d_in, cfg.d_sae) / cfg.d_in**0.5
        self.W_enc = nn.Parameter(w)
        self.W_dec = nn.Parameter(w.t().clone())  # [d_sae, d_in]
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = (x - self.b_dec) @ self.W_enc + self.b_enc
        vals, idx = pre.topk(min(self.cfg.k, pre.shape[-1]), dim=-1)
        return torch.zeros_like(pre).scatter(-1, idx, torch.relu(vals))

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.W_dec + self.b_dec

    def loss(self, batch: torch.Tensor, step: int) -> LossOutput:
        f = self.encode(batch)
        mse = (self.decode(f) - batch).pow(2).sum(-1).mean()
        return LossOutput(mse, {"mse": mse.detach()}, latents=f.detach())

    def fold_input_scale(self, scale: float) -> None:
        # Trained on scale * x: act on raw x instead (same latents, raw-scale output).
        with torch.no_grad():
            self.W_enc.mul_(scale)
            self.W_dec.div_(scale)
            self.b_dec.div_(scale)

    def saelens_export(self) -> SAELensExport:
        return "topk", saelens_tensors(self), {"k": int(self.cfg.k)}
