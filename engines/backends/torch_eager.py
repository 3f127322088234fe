"""PyTorch eager engines: the FP32 reference and the policy-driven precision engine."""

from __future__ import annotations

import re
from typing import ClassVar

import torch
from torch import nn

from engines.backends.base import EngineInfo, Runner
from engines.batch import TokenBatch
from engines.models import OutputForward, unmodified_copy
from engines.numerics import REFERENCE_NUMERICS, applied, tf32_enabled
from engines.precision.audit import DtypeAudit, check_policy
from engines.precision.policy import REFERENCE_POLICY
from engines.precision.torch_apply import apply_policy


def probe_batch(vocab_size: int, special_ids: tuple[int, ...], pad_id: int) -> TokenBatch:
    """A small padded batch that reaches every op: used for the precision audit."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab_size, (2, 12), generator=generator)
    if special_ids:
        ids[:, 0] = special_ids[0]
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    ids[1, 8:] = pad_id
    return TokenBatch(ids, mask, source="precision-audit probe")


# The blocks whose outputs a divergence trace compares: embeddings, each layer (BERT's encoder.layer.N,
# GPT-2's h.N) and its direct children, the final norm.
BLOCK_PATTERN = re.compile(r"(?:^|\.)(?:embeddings|wte|(?:layer|h)\.\d+(?:\.[^.]+)?|ln_f)$")


class TorchRunner(Runner):
    """Eager PyTorch with the model rewritten by :func:`apply_policy`."""

    backend: ClassVar[str] = "torch"
    mode: ClassVar[str] = "eager"

    def _make_module(self) -> nn.Module:
        return apply_policy(self.model.module, self.policy)

    def _build(self) -> None:
        module = self._make_module().to(self.device)
        self.forward = OutputForward(module, self.model.spec.output_name, self.model.spec.causal).eval()
        self.audit = self._run_audit()

    def _run_audit(self):
        probe = probe_batch(self.model.vocab_size, self.model.special_token_ids, self.model.pad_token_id)
        audit = DtypeAudit()
        # Module paths as inside the transformers model, as policy overrides name them.
        with torch.inference_mode(), audit.watching(self.forward.model):
            self.forward(probe.input_ids.to(self.device), probe.attention_mask.to(self.device))
        return check_policy(
            audit.records,
            self.policy,
            engine=self.name,
            tf32=self.device.type == "cuda" and tf32_enabled(),
        )

    @torch.inference_mode()
    def _run(self, staged: TokenBatch) -> torch.Tensor:
        return self.forward(staged.input_ids, staged.attention_mask).float()

    def intermediates(self, batch: TokenBatch) -> list[tuple[str, torch.Tensor]]:
        """Block outputs of the eager policy module (the one CUDA-graph and compiled engines capture), by forward hooks.

        Blocks: the embeddings, every transformer layer and each layer's direct children (attention, MLP,
        LayerNorms), the final norm; a tuple output's first tensor, as an FP32 copy on the engine's device.  An
        attention child also gives its attention probabilities, ``<name>.probs`` (batch, heads, query, key).
        """
        from engines.precision.torch_apply import CAPTURE_PROBS_ATTRIBUTE

        if not self._built:
            self.build()
        outputs: list[tuple[str, torch.Tensor]] = []

        def keep(name: str):
            def hook(module, inputs, output) -> None:
                probs = output[1] if isinstance(output, (tuple, list)) and len(output) > 1 else None
                if torch.is_tensor(probs) and probs.is_floating_point() and probs.dim() == 4:  # computed first
                    outputs.append((f"{name}.probs", probs.detach().float()))
                tensor = output[0] if isinstance(output, (tuple, list)) else output
                if torch.is_tensor(tensor) and tensor.is_floating_point():
                    outputs.append((name, tensor.detach().float()))
            return hook

        model = self.forward.model
        handles = [m.register_forward_hook(keep(name)) for name, m in model.named_modules() if BLOCK_PATTERN.search(name)]
        attention = [m for m in model.modules() if hasattr(m, CAPTURE_PROBS_ATTRIBUTE)]  # policy modules (not the reference's)
        for module in attention:
            setattr(module, CAPTURE_PROBS_ATTRIBUTE, True)
        staged = TorchRunner._stage(self, batch)  # unpadded, eager: not a captured graph
        try:
            self._trace_forward(staged)
        finally:
            for handle in handles:
                handle.remove()
            for module in attention:
                setattr(module, CAPTURE_PROBS_ATTRIBUTE, False)
        return outputs

    @torch.inference_mode()
    def _trace_forward(self, staged: TokenBatch) -> None:
        self.forward(staged.input_ids, staged.attention_mask)

    def _close(self) -> None:
        self.forward = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _info(self) -> EngineInfo:
        return EngineInfo(self.backend, f"torch {torch.__version__}", str(self.device), self.mode)


class ReferenceNotReproducibleError(RuntimeError):
    """The FP32 reference gave two different outputs for one input."""


class TorchReferenceRunner(TorchRunner):
    """The FP32 reference: the unmodified Hugging Face model, eager attention, TF32 off, deterministic kernels.

    It deliberately does not go through :func:`apply_policy`, so the ``torch/fp32``
    engine, which does, is checked against code it does not share.  Every call runs
    under :data:`engines.numerics.REFERENCE_NUMERICS`, whatever the engines under
    test use, and the build proves the reference reproducible: the probe batch twice,
    bitwise identical.
    """

    backend: ClassVar[str] = "torch-reference"
    mode: ClassVar[str] = "eager, unmodified transformers model, deterministic kernels"

    def __init__(self, model, policy=REFERENCE_POLICY, device: str = "cpu", options=None) -> None:
        if not policy.is_reference:
            raise ValueError("the reference engine runs FP32 only")
        super().__init__(model, policy, device, options)

    def _make_module(self) -> nn.Module:
        return unmodified_copy(self.model.module)

    def _build(self) -> None:
        with applied(REFERENCE_NUMERICS):
            super()._build()
            probe = probe_batch(self.model.vocab_size, self.model.special_token_ids, self.model.pad_token_id)
            staged = self._stage(probe)
            first, second = self._run(staged), self._run(staged)
        if not torch.equal(first, second):
            raise ReferenceNotReproducibleError(
                f"{self.model.name}: the FP32 reference gave two different outputs for one batch on {self.device} "
                f"(max difference {float((first - second).abs().max()):.3g}); its results cannot be a reference here"
            )

    def _run(self, staged: TokenBatch) -> torch.Tensor:
        with applied(REFERENCE_NUMERICS):
            return super()._run(staged)

    def _trace_forward(self, staged: TokenBatch) -> None:
        with applied(REFERENCE_NUMERICS):
            super()._trace_forward(staged)
