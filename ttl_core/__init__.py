"""ttl: a from-scratch Llama (TeenyTinyLlama) with its own Triton kernels and exact Hugging Face interop."""

from .config import PRESETS, LlamaConfig
from .errors import TTLError
from .generate import GenerateOutput, generate
from .hf import load_pretrained, save_native, save_pretrained
from .lora import apply_lora, merge_lora, unload_lora, unmerge_lora
from .lora_files import load_adapter, save_adapter
from .model import LlamaForCausalLM, LlamaForSequenceClassification, LlamaModel, build_model
from .streamer import TextStreamer
from .tokenizer import Tokenizer
from .tokenizer_train import train_tokenizer

__version__ = "0.1.0"

__all__ = [
    "PRESETS", "LlamaConfig", "TTLError", "GenerateOutput", "generate", "load_pretrained", "save_native",
    "save_pretrained", "apply_lora", "load_adapter", "merge_lora", "save_adapter", "unload_lora", "unmerge_lora",
    "LlamaForCausalLM", "LlamaForSequenceClassification", "LlamaModel", "build_model", "TextStreamer", "Tokenizer",
    "train_tokenizer",
]
