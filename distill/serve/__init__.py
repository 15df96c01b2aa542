"""Serving a student where it runs: the ONNX Runtime int8 export, and the latency/energy harness."""
