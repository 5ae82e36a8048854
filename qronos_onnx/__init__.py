"""qronos-onnx: post-training quantization of ONNX models with Qronos, GPTQ, GPFQ and RTN."""
__version__ = "0.1.0"

__all__ = ["QuantConfig", "QuantResult", "__version__", "load_recipe", "quantize"]


def __getattr__(name: str):
    # Lazy, so that `qronos-onnx --help` does not pay for importing torch and onnxruntime.
    if name in ("quantize", "QuantResult"):
        from . import api

        return getattr(api, name)
    if name in ("QuantConfig", "load_recipe"):
        from . import config

        return getattr(config, name)
    raise AttributeError(f"module 'qronos_onnx' has no attribute {name!r}")
