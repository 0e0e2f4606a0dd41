"""megatron-grpo: GRPO for LLMs on megatron-core policies with vLLM rollouts.

Data flow, one module per step: rollout -> rewards -> algorithms (advantages, loss) ->
models (logprobs) -> training (optimizer step) -> bridge (weight sync) -> next step.
Importing the package is cheap: heavy dependencies (megatron.core, vllm) are imported
by the submodules that need them.
"""
__version__ = "0.1.0"
