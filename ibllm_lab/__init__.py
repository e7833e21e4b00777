"""ibllm-lab: a research workbench for ImageBind-LLM multimodal instruction tuning.

The familiar entry points of the reference implementation::

    import ibllm_lab
    model = ibllm_lab.load(llama_dir, adapter_checkpoint, llama_type="7B", device="cuda")
    model.generate({"Image": [emb, 1]}, [ibllm_lab.format_prompt("Describe the image.")])
"""

from ibllm_lab.checkpoint import load
from ibllm_lab.config import AdapterConfig, LlamaConfig
from ibllm_lab.modality import Modality, fuse
from ibllm_lab.model import ImageBindLLM, format_prompt
from ibllm_lab.peft import mark_trainable
from ibllm_lab.tokenizer import Tokenizer

__version__ = "0.1.0"
__all__ = [
    "AdapterConfig",
    "ImageBindLLM",
    "LlamaConfig",
    "Modality",
    "Tokenizer",
    "__version__",
    "format_prompt",
    "fuse",
    "load",
    "mark_trainable",
]
