"""qronos-onnx: post-training quantization of ONNX models with Qronos, GPTQ, GPFQ and RTN."""
__version__ = "0.1.0"
