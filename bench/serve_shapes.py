"""A run folder with bert_to_tiny's shapes and random weights, for serving rows where the trained weights cannot go.

Latency and energy depend on shapes, dtypes and the sparsity pattern, not on the values: a lent GPU
machine that cannot receive a trained run (its files travel in 64 MiB) can still measure the teacher,
the dense student and the 2:4 student of `bert_to_tiny`. The teacher is MiniLM-L6's architecture
(read from its config); the student keeps two of its six layers, as `student=first_and_last` does;
the 2:4 student is that student with every encoder Linear cut to 2:4 by magnitude, as `nm24` leaves
it, and says so in compression.json, which is how `distill.serve_bench` knows to serve it 2:4.
Accuracy has no meaning here: the frontier's accuracies come from trained runs.

    python bench/serve_shapes.py --config sentence-transformers/all-MiniLM-L6-v2 --out /tmp/shapes
    python -m distill.serve_bench run_dir=/tmp/shapes/run task=classification teacher_path=/tmp/shapes/teacher
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from distill.kernels.sparsity import is_nm_sparse, nm_mask


def random_classifier(reference: str, layers: int | None = None):
    config = AutoConfig.from_pretrained(reference, num_labels=2)
    if layers is not None:
        config.num_hidden_layers = layers
    return AutoModelForSequenceClassification.from_config(config).eval()


@torch.no_grad()
def cut_two_four(model: torch.nn.Module) -> int:
    """Every encoder Linear weight to 2:4 by magnitude (along the input dimension); returns how many."""
    linears = [module for name, module in model.named_modules() if ".layer." in name and hasattr(module, "weight")]
    linears = [module for module in linears if isinstance(module, torch.nn.Linear)]
    for linear in linears:
        linear.weight.mul_(nm_mask(linear.weight, 2, 4))
        assert is_nm_sparse(linear.weight, 2, 4)
    return len(linears)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="sentence-transformers/all-MiniLM-L6-v2", help="hub id or folder")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--student-layers", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.config)
    teacher = random_classifier(args.config)
    teacher.save_pretrained(args.out / "teacher")
    tokenizer.save_pretrained(args.out / "teacher")
    student = random_classifier(args.config, args.student_layers)
    cut = cut_two_four(student)
    student_dir = args.out / "run" / "student"
    student.save_pretrained(student_dir)
    tokenizer.save_pretrained(student_dir)
    (student_dir / "compression.json").write_text(json.dumps({"NMSparsity": {"pattern": "2:4"}}))
    print(f"teacher {args.out / 'teacher'}; student {student_dir}: {cut} Linear layers 2:4, random weights")


if __name__ == "__main__":
    main()
