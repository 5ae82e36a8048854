"""Evaluation: perplexity of ONNX causal LMs in onnxruntime, the wiki-leads text, and where bench assets are cached."""
from .cache import cache_root, minilm_paths, mnist_paths, ppocr_paths, smollm2_paths, smollm2_ready, wikileads_paths
from .perplexity import PerplexityResult, make_session, perplexity, windows
from .wikileads import load_articles, split_text, tokenize, wikileads_dir

__all__ = [
    "PerplexityResult", "cache_root", "load_articles", "make_session", "minilm_paths", "mnist_paths", "perplexity",
    "ppocr_paths", "smollm2_paths", "smollm2_ready", "split_text", "tokenize", "wikileads_dir", "wikileads_paths",
    "windows",
]
