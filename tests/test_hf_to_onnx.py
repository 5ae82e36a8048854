"""tools/hf_to_onnx.py without its exporters: the translation of a transformers 5 config.json for optimum's older
transformers (which otherwise builds RoPE with theta 10,000 and exports a different model without an error), and the
folder of links optimum exports from. The routes themselves run in tests/test_genai_folder.py."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("hf_to_onnx", REPO / "tools" / "hf_to_onnx.py")
hf_to_onnx = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hf_to_onnx)


def test_rope_parameters_become_the_older_keys():
    v5 = {"model_type": "llama", "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}, "x": 1}
    assert hf_to_onnx.legacy_config(v5) == {"model_type": "llama", "x": 1, "rope_theta": 100000.0,
                                            "rope_scaling": None}
    llama3 = {"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
                                  "partial_rotary_factor": 0.5}}
    assert hf_to_onnx.legacy_config(llama3) == {
        "rope_theta": 5e5, "partial_rotary_factor": 0.5,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0}}
    assert hf_to_onnx.legacy_config({"rope_theta": 10000.0}) is None  # already the older form
    with pytest.raises(hf_to_onnx.StepError, match="one entry per layer type.*--route genai"):
        hf_to_onnx.legacy_config({"rope_parameters": {"full_attention": {"rope_theta": 1e6},
                                                      "sliding_attention": {"rope_theta": 1e4}}})


def test_export_source_links_the_checkpoint_and_never_writes_it(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    config = {"model_type": "llama", "rope_parameters": {"rope_theta": 500.0, "rope_type": "default"}}
    (hf / "config.json").write_text(json.dumps(config))
    (hf / "model.safetensors").write_bytes(b"weights")
    (hf / "tokenizer.json").write_text("{}")
    src = hf_to_onnx.export_source(hf, tmp_path / "out")
    assert src == tmp_path / "out" / "optimum-src"
    assert json.loads((src / "config.json").read_text())["rope_theta"] == 500.0
    assert (src / "model.safetensors").is_symlink() and (src / "model.safetensors").read_bytes() == b"weights"
    assert json.loads((hf / "config.json").read_text()) == config  # the checkpoint is untouched
    (hf / "config.json").write_text(json.dumps({"model_type": "llama", "rope_theta": 500.0}))
    assert hf_to_onnx.export_source(hf, tmp_path / "out2") == hf  # nothing to translate: optimum reads it as it is
