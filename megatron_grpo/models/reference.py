"""The reference policy of the KL penalty: a frozen copy, weights swapped in from CPU, or none.

Modes (what users of NeMo-RL / veRL / TRL know):

* ``"copy"``: a second GPTModel with the same TP/PP layout, built by ``model_factory`` and loaded
  with the policy's weights; frozen (no grads, eval mode). Costs one extra model on the device.
* ``"swap"``: (NeMo-RL's way) a CPU copy of the policy weights taken at construction; for the
  reference pass the live policy's weights are stashed to CPU, the reference weights copied in,
  the forward run, and the policy weights copied back. Same-dtype ``copy_`` both ways, so after
  the swap the policy parameters are bit-identical to before (optimizer state, fp32 main params
  and DDP buffers are never touched). Costs two CPU copies and host<->device traffic per pass.
* ``"none"``: no reference (``kl_coef == 0``); :meth:`ReferencePolicy.logprobs` returns None.

Every rank holds only its own TP/PP shard of the reference, exactly like the policy.
"""
from __future__ import annotations

import contextlib

import torch

from .logprobs import compute_logprobs

__all__ = ["REFERENCE_MODES", "ReferencePolicy", "build_reference"]

REFERENCE_MODES = ("copy", "swap", "none")


def _unwrap(module):
    """The bare model under DDP / Float16Module wrappers (their ``.module`` attribute)."""
    while hasattr(module, "module") and isinstance(module.module, torch.nn.Module):
        module = module.module
    return module


def _as_list(chunks):
    return list(chunks) if isinstance(chunks, (list, tuple)) else [chunks]


def _named_params(chunks):
    """[(chunk index, name, parameter)] of the bare modules, in a stable order."""
    return [(i, n, p) for i, c in enumerate(chunks) for n, p in _unwrap(c).named_parameters()]


class ReferencePolicy:
    """Reference logprobs for the KL term; see the module docstring for the modes."""

    def __init__(self, mode: str, policy_chunks, *, model_factory=None):
        if mode not in REFERENCE_MODES:
            raise ValueError(f"reference mode {mode!r}; expected one of {REFERENCE_MODES}")
        self.mode = mode
        self.policy_chunks = _as_list(policy_chunks)
        self.ref_chunks = None
        self._ref_cpu = None
        self._stash = None
        if mode == "copy":
            if model_factory is None:
                raise ValueError("reference mode 'copy' needs model_factory() -> this rank's bare model chunk(s)")
            self.ref_chunks = _as_list(model_factory())
            for c in self.ref_chunks:
                c.eval()
                for p in c.parameters():
                    p.requires_grad_(False)
        if mode in ("copy", "swap"):
            self.refresh()

    # -------------------------------------------------------------- weights
    @torch.no_grad()
    def refresh(self):
        """Make the reference equal to the CURRENT policy weights (at start, or a periodic reset)."""
        policy = _named_params(self.policy_chunks)
        if self.mode == "copy":
            ref = _named_params(self.ref_chunks)
            if [(i, n, tuple(p.shape)) for i, n, p in ref] != [(i, n, tuple(p.shape)) for i, n, p in policy]:
                raise ValueError("reference model from model_factory does not match the policy's parameters/layout")
            for (_, _, r), (_, _, p) in zip(ref, policy):
                r.copy_(p)
        elif self.mode == "swap":
            pin = torch.cuda.is_available()
            self._ref_cpu = [torch.empty(p.shape, dtype=p.dtype, device="cpu", pin_memory=pin) for _, _, p in policy]
            self._stash = [torch.empty_like(t, pin_memory=pin) for t in self._ref_cpu]
            for buf, (_, _, p) in zip(self._ref_cpu, policy):
                buf.copy_(p.detach())

    @contextlib.contextmanager
    def swapped_in(self):
        """Swap mode: inside the block the policy chunks hold the reference weights."""
        if self.mode != "swap":
            raise RuntimeError(f"swapped_in() is for mode 'swap', not {self.mode!r}")
        params = [p for _, _, p in _named_params(self.policy_chunks)]
        with torch.no_grad():
            for stash, ref, p in zip(self._stash, self._ref_cpu, params):
                stash.copy_(p.detach(), non_blocking=True)
                p.detach().copy_(ref, non_blocking=True)
        try:
            yield
        finally:
            with torch.no_grad():
                for stash, p in zip(self._stash, params):
                    p.detach().copy_(stash, non_blocking=True)
                if torch.cuda.is_available():
                    torch.cuda.current_stream().synchronize()  # CPU buffers reusable, weights back

    # -------------------------------------------------------------- logprobs
    def logprobs(self, input_ids, mask=None, routing_record=None, **kwargs):
        """Reference logprobs ``[B, T]`` on every rank (None in mode ``"none"``).

        Same arguments and alignment as :func:`megatron_grpo.models.logprobs.compute_logprobs`
        (``micro_batch_size``, ``temperature``, ``vocab_size``, ...). ``routing_record``: a
        ``routing_replay.RoutingRecord`` of the old pass, replayed (R2).
        """
        if self.mode == "none":
            return None
        chunks = self.ref_chunks if self.mode == "copy" else self.policy_chunks
        if routing_record is not None and routing_record.tensor is not None:
            from .routing_replay import RoutingPass

            kwargs["routing"] = RoutingPass(chunks, "replay", routing_record)
        if self.mode == "copy":
            return compute_logprobs(self.ref_chunks, input_ids, mask, **kwargs)
        with self.swapped_in():
            return compute_logprobs(self.policy_chunks, input_ids, mask, **kwargs)


def build_reference(policy_chunks, *, mode: str = "swap", kl_coef: float, model_factory=None) -> ReferencePolicy:
    """The reference for a run: ``"none"`` whenever ``kl_coef == 0`` (nothing to compute or store)."""
    if kl_coef == 0.0:
        return ReferencePolicy("none", policy_chunks)
    if mode == "none":
        raise ValueError(f"kl_coef={kl_coef} needs a reference policy: mode 'copy' or 'swap'")
    return ReferencePolicy(mode, policy_chunks, model_factory=model_factory)
