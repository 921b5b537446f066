"""Exporters: the current student to ONNX and TensorRT."""
