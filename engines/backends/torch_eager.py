"""PyTorch eager engines: the FP32 reference and the policy-driven precision engine."""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import torch
from torch import nn

from engines.precision.audit import DtypeAudit, check_policy, raise_on_mismatch
from engines.backends.base import Runner
from engines.batch import TokenBatch
from engines.env import tf32_enabled
from engines.precision.policy import REFERENCE_POLICY
from engines.precision.torch_apply import apply_policy


class OutputForward(nn.Module):
    """``(input_ids, attention_mask) -> tensor``: the one output a model is compared on.

    BERT-family models give ``last_hidden_state``, GPT-2 gives ``logits`` (no KV
    cache).  The ONNX export wraps the same module, so every backend sees the
    same graph.
    """

    def __init__(self, model: nn.Module, output_name: str, causal: bool) -> None:
        super().__init__()
        self.model = model
        self.output_name = output_name
        self.causal = causal

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "return_dict": True}
        if self.causal:
            kwargs["use_cache"] = False
        return getattr(self.model(**kwargs), self.output_name)


def unmodified_copy(model: nn.Module) -> nn.Module:
    """A copy of the FP32 transformers model with its own eager attention: the reference's code."""
    module = copy.deepcopy(model)
    module.set_attn_implementation("eager")
    return module.eval()


def reference_forward(model) -> OutputForward:
    """The FP32 reference as ``(input_ids, attention_mask) -> output``; what the ONNX export wraps too."""
    return OutputForward(unmodified_copy(model.module), model.spec.output_name, model.spec.causal).eval()


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


class TorchRunner(Runner):
    """Eager PyTorch with the model rewritten by :func:`apply_policy`."""

    backend: ClassVar[str] = "torch"

    def _make_module(self) -> nn.Module:
        return apply_policy(self.model.module, self.policy)

    def _build(self) -> None:
        module = self._make_module().to(self.device)
        self.forward = OutputForward(module, self.model.spec.output_name, self.model.spec.causal).eval()
        self.audit = self._run_audit()
        raise_on_mismatch(self.audit)

    def _run_audit(self):
        probe = probe_batch(self.model.vocab_size, self.model.special_token_ids, self.model.pad_token_id)
        audit = DtypeAudit()
        with torch.inference_mode(), audit.watching(self.forward):
            self.forward(probe.input_ids.to(self.device), probe.attention_mask.to(self.device))
        return check_policy(
            audit.records,
            self.policy,
            engine=self.name,
            tf32=self.device.type == "cuda" and tf32_enabled(),
        )

    @torch.inference_mode()
    def _infer(self, batch: TokenBatch) -> torch.Tensor:
        ids = batch.input_ids.to(self.device, non_blocking=True)
        mask = batch.attention_mask.to(self.device, non_blocking=True)
        return self.forward(ids, mask).float()

    def _close(self) -> None:
        self.forward = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "runtime": f"torch {torch.__version__}",
            "device": str(self.device),
            "mode": "eager",
        }


class TorchReferenceRunner(TorchRunner):
    """The FP32 reference: the unmodified Hugging Face model, eager attention, TF32 off.

    It deliberately does not go through :func:`apply_policy`, so the ``torch/fp32``
    engine, which does, is checked against code it does not share.
    """

    backend: ClassVar[str] = "torch-reference"

    def __init__(self, model, device: str, policy=REFERENCE_POLICY) -> None:
        if not policy.is_reference:
            raise ValueError("the reference engine runs FP32 only")
        super().__init__(model, policy, device)

    def _make_module(self) -> nn.Module:
        return unmodified_copy(self.model.module)

    def describe(self) -> dict[str, Any]:
        return dict(super().describe(), mode="eager, unmodified transformers model")
