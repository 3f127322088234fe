"""ONNX graphs: the verified FP32 export of a model and its cached per-policy precision graphs.

Every ONNX-based backend (onnxrt, onnx-torch, trt) starts from the same cached file for
the same model and policy.
"""
