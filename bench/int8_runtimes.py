"""CPU int8 runtimes for the bert_to_tiny student, side by side: which one ``qat8`` should export.

    python bench/int8_runtimes.py [--student <run>/student] [--repeats 30] [--threads 1 2]

Arms, all on the same batches of real SST-2 dev sentences (batch 1 and 32), interleaved round by round
(``distill.serve.latency``): PyTorch fp32 eager (the baseline), torchao's CPU int8 (int8 dynamic
activations, int8 weights: what ``qat8`` exported until this bench), ONNX Runtime fp32 and ONNX Runtime
int8 (``distill.serve.onnx_int8``: dynamic int8 MatMuls, the last layer traced for the [CLS] position the head
reads), the same int8 graph with every position in the last layer (what that tracing saves), on a CPU whose
exact int8 arithmetic is u8u8 (``distill.serve.int8_arithmetic``) the int8 graph in the faster, saturating
u8s8 as well, and the teacher
(MiniLM-L6, PyTorch fp32). Only the encoder Linears are quantized, as ``qat8`` does. Without ``--student`` the
student is built as the run builds it (MiniLM-L6, layers 0 and 5); the teacher is the base MiniLM-L6 with a
2-class head: weights do not change times. Prints markdown (median ms, speed-up over the PyTorch fp32 student
and over the teacher); writes JSON to bench/results/.
"""

from __future__ import annotations

import os

# PyTorch's OpenMP threads and ONNX Runtime's pool both spin after each call by default; interleaved in one
# process on 2 cores, each arm would pay for the other's spinning. Set before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import copy
import csv
import json
import tempfile
from functools import partial
from pathlib import Path

import torch
from torch import nn
from torchao.quantization import Int8DynamicActivationIntxWeightConfig, PerAxis, quantize_
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from distill.serve.int8_arithmetic import int8_arithmetic
from distill.serve.latency import measure, summarize
from distill.serve.onnx_int8 import OnnxModel, cpu_session, export_onnx, save_int8

TEACHER = "sentence-transformers/all-MiniLM-L6-v2"


def teacher() -> nn.Module:
    return AutoModelForSequenceClassification.from_pretrained(TEACHER, num_labels=2).eval()


def student(path: str | None) -> nn.Module:
    if path:
        return AutoModelForSequenceClassification.from_pretrained(path).eval()
    model = teacher()
    model.bert.encoder.layer = nn.ModuleList([model.bert.encoder.layer[0], model.bert.encoder.layer[5]])
    model.config.num_hidden_layers = 2
    return model


def dev_batches(tokenizer, sizes: list[int]) -> dict[int, dict[str, torch.Tensor]]:
    data_dir = Path(os.environ.get("DISTILL_DATA_DIR", "../shared/data"))
    with open(data_dir / "sst2" / "dev.tsv", newline="") as handle:
        sentences = [row["sentence"] for row in csv.DictReader(handle, delimiter="\t")]
    return {size: dict(tokenizer(sentences[:size], padding=True, return_tensors="pt")) for size in sizes}


def encoder_linears(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if ".encoder.layer." in f".{n}" and isinstance(m, nn.Linear)]


def torchao_int8(model: nn.Module, layers: list[str]) -> nn.Module:
    converted = copy.deepcopy(model)
    config = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0))
    quantize_(converted, config, filter_fn=lambda module, name: name in layers)
    return converted


def run(args: argparse.Namespace) -> list[dict]:
    model = student(args.student)
    tokenizer = AutoTokenizer.from_pretrained(args.student or TEACHER)
    batches = dev_batches(tokenizer, [1, 32])
    layers, teacher_model = encoder_linears(model), teacher()
    folder = Path(tempfile.mkdtemp())
    export_onnx(model, batches[32], folder / "fp32.onnx")
    save_int8(model, layers, tokenizer, folder / "int8", partial(export_onnx, model, batches[32]))
    every_position = partial(export_onnx, model, batches[32], first_token_only=False)
    save_int8(model, layers, tokenizer, folder / "int8_every_position", every_position)
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        models = {
            "teacher_pytorch_fp32": teacher_model,
            "pytorch_fp32": model,
            "torchao_int8": torchao_int8(model, layers),
            "onnxruntime_fp32": OnnxModel(folder / "fp32.onnx", threads),
            "onnxruntime_int8": OnnxModel(folder / "int8", threads),
            "onnxruntime_int8_every_position": OnnxModel(folder / "int8_every_position", threads),
        }
        if int8_arithmetic() == "u8u8":  # what exactness costs where the fast u8s8 kernels saturate
            u8s8 = cpu_session(folder / "int8", threads, arithmetic="u8s8")
            models["onnxruntime_int8_u8s8_saturating"] = OnnxModel(folder / "int8", session=u8s8)
        for size, batch in batches.items():
            arms = {name: partial(forward, net, batch) for name, net in models.items()}
            with torch.inference_mode():
                samples = measure(arms, args.warmup, args.repeats)
            base = summarize(samples["pytorch_fp32"], size)["p50_ms"]
            over_teacher = summarize(samples["teacher_pytorch_fp32"], size)["p50_ms"]
            for name, timing in samples.items():
                p50 = summarize(timing, size)["p50_ms"]
                row = {"arm": name, "threads": threads, "batch": size, "p50_ms": p50, "speedup": base / p50}
                rows.append(row | {"speedup_over_teacher": over_teacher / p50})
    return rows


def forward(model: nn.Module, batch: dict[str, torch.Tensor]):
    return model(**batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", default=None, help="a save_pretrained student folder (default: built)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    rows = run(args)
    print("| arm | threads | batch | p50 ms | vs PyTorch fp32 student | vs teacher |\n|---|---|---|---|---|---|")
    for row in rows:
        cells = f"{row['p50_ms']:.2f} | {row['speedup']:.2f}x | {row['speedup_over_teacher']:.2f}x"
        print(f"| {row['arm']} | {row['threads']} | {row['batch']} | {cells} |")
    out = Path(__file__).parent / "results" / "int8_runtimes.json"
    out.parent.mkdir(exist_ok=True)
    environment = {
        "torch": torch.__version__,
        "OMP_WAIT_POLICY": os.environ["OMP_WAIT_POLICY"],
        "int8_arithmetic": int8_arithmetic(),
    }
    out.write_text(json.dumps({"args": vars(args), **environment, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
