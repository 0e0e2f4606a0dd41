"""Rank bodies: megatron-core's own schedule + DDP + optimizer on the CPU compatibility layer.

Deliberately independent of megatron_grpo.models (which has its own tests): this proves the platform
layer alone lets real megatron-core train at TP/PP > 1 on gloo.
"""
from __future__ import annotations

import torch


def train_loss_falls(tp: int, pp: int, steps: int = 6, clip_grad: float = 1.0) -> dict:
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer import TransformerConfig

    from megatron_grpo.distributed.init import destroy_distributed, init_distributed
    from megatron_grpo.platform import cpu_compat_enabled

    layout = init_distributed(tp=tp, pp=pp, seed=1234)
    vocab, seq, mbs, n_micro = 128, 16, 2, 2
    config = TransformerConfig(
        num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
        kv_channels=16, normalization="RMSNorm", gated_linear_unit=True, activation_func=torch.nn.functional.silu,
        add_bias_linear=False, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        pipeline_dtype=torch.float32, params_dtype=torch.float32, use_cpu_initialization=True,
        hidden_dropout=0.0, attention_dropout=0.0,
    )
    model = GPTModel(
        config=config, transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=vocab, max_sequence_length=seq, position_embedding_type="rope",
        pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=False,
    )
    ddp = DistributedDataParallel(
        config=config, ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True), module=model,
    )
    config.finalize_model_grads_func = finalize_model_grads
    opt = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=3e-3, clip_grad=clip_grad, params_dtype=torch.float32), [ddp]
    )
    gen = torch.Generator().manual_seed(7)  # same fixed batch on every rank
    tokens = torch.randint(0, vocab, (n_micro, mbs, seq + 1), generator=gen)

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        pos = torch.arange(seq).unsqueeze(0).expand(mbs, seq)
        out = model(input_ids=batch[:, :-1], position_ids=pos, attention_mask=None, labels=batch[:, 1:])

        def loss_func(per_token):
            loss = per_token.float().mean()
            return loss, {"loss": loss.detach()}

        return out, loss_func

    fb = get_forward_backward_func()
    losses, grad_norms = [], []
    for _ in range(steps):
        ddp.zero_grad_buffer()
        opt.zero_grad()
        out = fb(forward_step_func=forward_step, data_iterator=iter(list(tokens)), model=[ddp],
                 num_microbatches=n_micro, seq_length=seq, micro_batch_size=mbs, forward_only=False)
        ok, grad_norm, _ = opt.step()
        assert ok, "optimizer step skipped"
        grad_norms.append(float(grad_norm))
        if ps.is_pipeline_last_stage():
            losses.append(float(sum(o["loss"] for o in out) / len(out)))
    result = {"layout": [layout.tp, layout.pp, layout.dp], "losses": losses, "grad_norms": grad_norms,
              "compat": cpu_compat_enabled()}
    destroy_distributed()
    return result
