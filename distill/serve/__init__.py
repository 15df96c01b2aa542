"""Serving a student where it runs: the ONNX Runtime int8 export, GGUF files for llama.cpp (written by
``gguf_export``, run and scored in llama.cpp's own runtime by ``llamacpp``), and the latency/energy harness."""
