from setuptools import find_packages, setup

setup(
    name="ttl",
    version="0.1.0",
    description="TeenyTinyLlama from scratch: Llama model, Triton kernels, training and HF interop",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["ttl_core", "ttl_core.*", "ttl_kernels", "ttl_kernels.*"]),
    package_data={"ttl_core": ["sample_data/*.txt", "sample_data/*.csv", "sample_data/*.jsonl"]},
    install_requires=[
        # 2.9 at least (docs/versions.md): torch 2.8's FSDP2 summed the ranks' gradients over gloo instead
        # of averaging them, and the Triton of torch 2.6 and 2.7 cannot build an autotuner on a machine without a GPU
        "torch>=2.9",
        "triton; platform_system == 'Linux'",
        "numpy",
        "safetensors",
        "sentencepiece",
        "protobuf",  # sentencepiece's model proto, which the tokenizer reads and writes, needs it
        "tqdm",
        "tomli; python_version < '3.11'",  # training configs are TOML; Python 3.11+ ships tomllib
    ],
    extras_require={
        "flash": ["flash-attn"],
        "plot": ["matplotlib"],  # loss curves (RUN/loss.png) and benchmark plots
        # transformers and peft are the tests' references, from the oldest releases the suite passes against
        # (transformers 5.17, the GPU image's) and capped above the newest (5.25, 0.21), so a new release is
        # checked on purpose (raise the cap) rather than by surprise
        "dev": ["pytest", "pytest-xdist", "transformers>=5.17,<5.26", "peft>=0.21,<0.22", "tokenizers", "pyarrow",
                "matplotlib"],
    },
)
