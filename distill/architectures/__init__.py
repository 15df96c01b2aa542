"""What differs between model families (Llama, Qwen, Gemma, Phi-3, GPT-NeoX, GPT-2, ...), in one place.

Everything model-specific in the package reads from here: where the decoder layers are, what each
holds, how its Linear-like layers are laid out, and how the LM head turns hidden states into logits.
"""
