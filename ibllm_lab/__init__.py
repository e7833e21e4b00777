"""ibllm-lab: a research workbench for ImageBind-LLM multimodal instruction tuning."""

from ibllm_lab.modality import Modality, fuse

__version__ = "0.1.0"
__all__ = ["Modality", "fuse", "__version__"]
