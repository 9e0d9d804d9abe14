"""vlmpool: pools of vision-language models on vLLM, serving many LoRA adapters per pool."""

__version__ = "0.1.0"
