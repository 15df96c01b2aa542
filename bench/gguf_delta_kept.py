"""How much of what distillation changed survives re-quantization to each GGUF type.

    python bench/gguf_delta_kept.py --before ~/.cache/distill/students/pruned-<key> --after <run>/student

``--before``: the student as cut from the teacher (``distill.models.student.pruned`` caches it under
``students/``); ``--after``: the trained student. For each type, each block weight is quantized and de-quantized
with the ``gguf`` package's quantizers (llama.cpp's reference ones) before and after training; printed: the
least-squares coefficient of the re-quantized change on the trained change (1 = the change survives on average,
0 = rounding undoes it), and the share of weights whose de-quantized value did not move at all.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, quants
from safetensors.numpy import load_file

TYPES = ["Q4_1", "Q4_0", "Q5_0", "Q8_0"]


def roundtrip(weight: np.ndarray, kind: GGMLQuantizationType) -> np.ndarray:
    return quants.dequantize(quants.quantize(weight, kind), kind)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", type=Path, required=True)
    parser.add_argument("--after", type=Path, required=True)
    parser.add_argument("--layers", nargs="+", type=int, default=[3, 7, 10])
    args = parser.parse_args()
    before, after = (load_file(str(folder / "model.safetensors")) for folder in (args.before, args.after))
    names = [name for name in after if any(f"layers.{layer}." in name for layer in args.layers) and "proj" in name]
    print(f"{len(names)} block weights of layers {args.layers}\n")
    print("| type | change kept | values unmoved |\n|---|---|---|")
    for type_name in TYPES:
        kind = GGMLQuantizationType[type_name]
        kept, unmoved, total = [], 0, 0
        for name in names:
            old, new = before[name].astype(np.float32), after[name].astype(np.float32)
            trained, requantized = (new - old).ravel(), (roundtrip(new, kind) - roundtrip(old, kind)).ravel()
            kept.append(float(trained @ requantized / (trained @ trained)))
            unmoved, total = unmoved + int((requantized == 0).sum()), total + requantized.size
        print(f"| {type_name} | {np.mean(kept):.3f} | {unmoved / total:.3f} |")


if __name__ == "__main__":
    main()
