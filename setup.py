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
        "torch>=2.6",  # FSDP2's public fully_shard, torch.nn.utils.get_total_norm
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
        # transformers and peft are the tests' references: capped above the releases the suite last passed
        # against (5.25, 0.21), so a new release is checked on purpose (raise the cap) rather than by surprise
        "dev": ["pytest", "transformers>=4.45,<5.26", "peft<0.22", "tokenizers", "pyarrow", "matplotlib"],
    },
)
