"""vlmpool: pools of vision-language models on vLLM, serving many LoRA adapters per pool."""

__version__ = "0.1.0"

API_GROUP = "vlmpool.io"
API_VERSION = "v1alpha1"
