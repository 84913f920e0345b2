"""cbd-jax: Chain-based Distillation in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="cbd-jax",
    version="0.1.0",
    description="Chain-based Distillation: a chain of distilled anchors, any size in between.",
    packages=find_packages(include=["cbd_jax", "cbd_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.6",
        "flax>=0.10",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "transformers>=5.0",
        "tokenizers>=0.21",
        "huggingface_hub>=0.30",
        "datasets>=3.0",
        "safetensors>=0.5",
        "ml_collections>=1.0",
        "einops>=0.8",
        "gguf>=0.16",
        "numpy",
        "scipy",
        "ml_dtypes",
        "tqdm",
    ],
    extras_require={
        # The numerical oracle (PyTorch transformers) and the tools for tests and benchmarks.
        # libtpu (via jax[tpu], pinned by jax to its own version) lets any Linux machine compile
        # the train step for a TPU topology (launch/aot_compile.py); tests use it too.
        "dev": ["torch==2.13.0", "accelerate>=1.0", "pytest>=8", "matplotlib", "ruff",
                "jax[tpu]; sys_platform == 'linux'", "lm-eval[hf]==0.4.13"],
        "tpu": ["jax[tpu]"],
        # Standard-task evaluation (launch/evaluate.py): lm-evaluation-harness, JAX backend.
        "eval": ["lm-eval==0.4.13"],
    },
    package_data={"cbd_jax.evaluation.lm_tasks": ["*.yaml"]},  # Local lm-eval tasks.
)
