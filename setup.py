from setuptools import find_packages, setup

setup(
    name="nanokv",
    version="0.1.0",
    description="A small, readable inference engine that owns its KV cache, for KV-cache compression research.",
    python_requires=">=3.10",
    # One top-level name: `kernels` and `models` belong to other packages (transformers requires
    # Hugging Face's `kernels`), so nanokv's live inside it.
    packages=find_packages(include=["nanokv", "nanokv.*"]),
    # the C++ kernels are built on the user's machine (nanokv/kernels/cpu.py); the shipped model
    # configs serve --load-format dummy (nanokv/hub.py)
    package_data={"nanokv.kernels": ["*.cpp", "*.h"], "nanokv.models": ["configs/*.json"]},
    entry_points={"console_scripts": ["nanokv-generate = nanokv.cli.generate:main",
                                      "nanokv-bench = nanokv.cli.bench:main",
                                      "nanokv-serve = nanokv.serve.cli:main"]},
    install_requires=[
        # torch is installed first, on its own (see the Makefile): an unpinned torch can pull a
        # multi-GB CUDA build where a CPU build is wanted.
        "torch>=2.5",
        "safetensors>=0.4",
        "tokenizers>=0.21",
        "huggingface-hub>=0.26",
        "gguf>=0.10",
        "numpy>=1.26",
        "jinja2>=3.1",
        "tqdm>=4.66",
    ],
    extras_require={
        # The versions the suite last ran against are pinned in constraints.txt (make test uses it).
        # triton: torch's CUDA builds bring it; on CPU the tests run the kernels in its interpreter.
        # It has wheels for Linux only.
        "test": ["pytest>=8", "transformers>=5.0,<6", "accelerate>=1.0", "matplotlib>=3.8",
                 "triton>=3.2; platform_system == 'Linux'", "openai>=1.40", "starlette>=0.40", "uvicorn>=0.30"],
        # the HTTP server (python -m nanokv.serve): an ASGI app and its server, nothing else
        "serve": ["starlette>=0.40", "uvicorn>=0.30"],
        "plot": ["matplotlib>=3.8"],
        "flash": ["flash-attn>=2.6"],  # CUDA only, optional
    },
)
