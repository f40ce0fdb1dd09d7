"""sdrt export: diffusers pipelines to validated ONNX artifacts (and TensorRT engines on NVIDIA GPUs).

Build-time only: needs the ``[export]`` extra (torch, diffusers, transformers, onnx).
"""
