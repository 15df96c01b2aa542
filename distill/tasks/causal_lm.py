"""Causal language modelling: every position predicts the next token, scored by perplexity.

Position ``i`` of a block is compared with token ``i + 1``: :meth:`CausalLMTask.align` drops the
last position of the logits (and of stored teacher targets) and the first label, so the KD and CE
terms count exactly the tokens whose label is not -100 (padding, and prompts in prompt/response
data). Held-out perplexity is ``exp(sum of token NLL / tokens)`` over the non-overlapping blocks of
a split, token-weighted, accumulated across batches and data-parallel ranks.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric
from transformers import AutoModelForCausalLM

from distill.architectures.head import head_scale
from distill.data.base import DataModule, LanguageModelData
from distill.kernels.kd_loss_linear import kd_loss_linear, kd_loss_linear_topk
from distill.losses.kd import KDLossTerms
from distill.losses.topk import TopKTargets
from distill.serve.generation import Generator, SamplingSettings, end_token_ids
from distill.serve.gguf_checks import run_ggufs
from distill.serve.onnx_decoder import export_decoder
from distill.tasks.base import EvaluatedModule, FusedStep
from distill.tasks.rouge import rouge_l
from distill.utils.devices import model_device, to_device
from distill.utils.keys import EXAMPLE_INDEX
from distill.utils.run_record import write_json


class Perplexity(Metric):
    """``exp(total NLL / total tokens)`` from per-batch sums (fp64, so long splits lose nothing)."""

    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("nll", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, nll_sum: Tensor, tokens: Tensor) -> None:
        self.nll += nll_sum.double()
        self.tokens += tokens

    def compute(self) -> Tensor:
        return torch.exp(self.nll / self.tokens.clamp(min=1))


def next_token_nll(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> tuple[Tensor, Tensor]:
    """Summed next-token NLL (fp32) and the number of tokens it counts."""
    targets = labels[..., 1:]
    flat = logits[..., :-1, :].reshape(-1, logits.shape[-1]).float()
    nll = F.cross_entropy(flat, targets.reshape(-1), ignore_index=ignore_index, reduction="sum")
    return nll, (targets != ignore_index).sum()


@torch.inference_mode()
def perplexity(model: nn.Module, loader: Any) -> float:
    """Token-weighted ``exp(mean NLL)`` of ``model`` over a loader of packed blocks."""
    device = model_device(model)
    # One process scores (rank 0's export under DDP): no other rank joins a sync.
    metric = Perplexity(sync_on_compute=False).to(device)
    was_training = model.training
    model.eval()
    for batch in loader:
        labels = batch.pop("labels").to(device)
        batch.pop(EXAMPLE_INDEX, None)
        metric.update(*next_token_nll(model(**to_device(batch, device)).logits, labels))
    model.train(was_training)
    return float(metric.compute())


def greedy_responses(model: nn.Module, tokenizer: Any, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """Greedy, KV-cached responses of ``model`` to token-id ``prompts``, batched (left-padded)."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    generator = Generator(model, SamplingSettings(max_new_tokens=new_tokens), pad_id, end_token_ids(model, tokenizer))
    return [response for response, _ in generator(prompts)]


def drop_last_position(targets: Tensor | TopKTargets) -> Tensor | TopKTargets:
    if isinstance(targets, TopKTargets):
        return targets._replace(
            values=targets.values[..., :-1, :],
            indices=targets.indices[..., :-1, :],
            rest_log_mass=targets.rest_log_mass[..., :-1],
        )
    return targets[..., :-1, :]


class CausalLMTask:
    """Logits ``(batch, positions, vocabulary)`` from a ``*ForCausalLM`` model.

    Args:
        fused_kd: with the forward-KL divergence, compute the loss from the student's last hidden
            states and LM head and either the live teacher's (:func:`distill.kernels.kd_loss_linear`)
            or the stored top-K targets, chunk by chunk: no full-size logits exist in the training step.
        gguf: llama-quantize presets (e.g. ``[q4_1, q4_k_m]``) the exported student is also written as, for
            llama.cpp (``student_gguf/``), each scored there on the held-out windows of ``test/ppl``.
    """

    name = "causal_lm"
    auto_model = AutoModelForCausalLM
    monitor, monitor_mode = "val/ppl", "min"
    generates = True
    latency_batch_sizes = ()  # serving speed of language models: prefill/decode, not one forward
    target_unit = "tokens"

    def __init__(
        self, fused_kd: bool = True, samples: int = 4, prompt_tokens: int = 32, new_tokens: int = 48,
        gguf: list[str] | None = None,
    ) -> None:  # fmt: skip
        self.fused_kd, self.gguf = fused_kd, list(gguf or [])
        # Set by the run when teacher and student pad their vocabularies differently: the logits are
        # compared on the first `vocabulary` ids (the tokenizer's) only.
        self.vocabulary: int | None = None
        self.samples, self.prompt_tokens, self.new_tokens = samples, prompt_tokens, new_tokens

    def model_kwargs(self) -> dict[str, Any]:
        return {}

    def align(self, student_logits: Tensor, teacher_targets: Any, labels: Tensor) -> tuple[Tensor, Any, Tensor]:
        teacher = drop_last_position(teacher_targets) if teacher_targets is not None else None
        if self.vocabulary is not None:
            student_logits = student_logits[..., : self.vocabulary]
            teacher = teacher[..., : self.vocabulary] if isinstance(teacher, Tensor) else teacher
        return student_logits[..., :-1, :], teacher, labels[..., 1:]

    def count_targets(self, labels: Tensor) -> Tensor:
        """Tokens that count in a training batch: those with a next token that is not -100 (0-dim, on
        the labels' device: the training step never waits to read it)."""
        return (labels[..., 1:] != -100).sum()

    def fused_terms(self, step: FusedStep, batch: dict[str, Tensor], labels: Tensor) -> KDLossTerms | None:
        """The step's loss through the fused head kernels, or ``None`` where they do not apply: the
        student's hidden states times its LM head, chunk by chunk, against the live teacher's head
        (:func:`kd_loss_linear`) or the stored top-K targets (:func:`kd_loss_linear_topk`).

        A head that scales its logits (Granite, Cohere) has the scale folded into its weight and bias;
        one that is not affine in the hidden state (Gemma 2's softcapping) takes the logits path.
        """
        if not self.fused_kd or step.divergence != "forward_kl":
            return None
        if step.stored is not None and not isinstance(step.stored, TopKTargets):
            return None  # full-vocabulary stores take the logits path
        student_head = self._head(step.student)
        teacher_head = self._head(step.teacher.model) if step.stored is None else None
        if student_head is None or (step.stored is None and teacher_head is None):
            return None
        student_hidden = step.student.base_model(**batch).last_hidden_state[..., :-1, :]
        (student_weight, student_bias), targets = student_head, labels[..., 1:]
        settings = dict(temperature=step.temperature, alpha=step.alpha, student_bias=student_bias)
        if step.stored is not None:
            loss = kd_loss_linear_topk(
                student_hidden, student_weight, drop_last_position(step.stored), targets, **settings
            )
        else:
            teacher_hidden = step.teacher.last_hidden_state(batch)[..., :-1, :]
            teacher_weight, teacher_bias = teacher_head
            loss = kd_loss_linear(
                student_hidden, student_weight, teacher_hidden, teacher_weight, targets, teacher_bias=teacher_bias,
                **settings,
            )  # fmt: skip
        return KDLossTerms(loss=loss, ce=None, kd=None)

    def _head(self, model: nn.Module) -> tuple[Tensor, Tensor | None] | None:
        """The weight and bias that give ``model``'s logits from its last hidden state (its LM head's, times
        the head's scale), cut to the shared vocabulary; ``None`` if no affine map gives them."""
        scale = head_scale(model.config)
        if scale is None:
            return None
        head, rows = model.get_output_embeddings(), slice(None, self.vocabulary)
        weight, bias = head.weight[rows], head.bias[rows] if head.bias is not None else None
        if scale == 1.0:  # the common case keeps the parameters themselves (no scaled copy per step)
            return weight, bias
        return weight * scale, bias * scale if bias is not None else None

    def make_metrics(self) -> nn.ModuleDict:
        return nn.ModuleDict(
            {f"{stage}_{name}": Perplexity() for stage in ("val", "test") for name in ("ppl", "teacher_ppl")}
        )

    def evaluate(self, module: EvaluatedModule, batch: dict[str, Tensor], stage: str) -> None:
        labels = batch.pop("labels")
        nll, tokens = next_token_nll(module(batch), labels)
        module.update_metric(f"{stage}/ppl", int(tokens), nll, tokens)
        if module.teacher is not None:
            # The NLL counts the tokens whose label is not -100 (prompts are masked), so the labels are part
            # of the key. Entries of memo files written before they were are keyed otherwise and never read.
            teacher_nll, teacher_tokens = module.teacher.memoized(
                batch,
                lambda out: torch.stack([*next_token_nll(out.logits, labels)]).double(),
                "next_token_nll",
                key_tensors={"labels": labels},
            )
            module.update_metric(f"{stage}/teacher_ppl", int(tokens), teacher_nll, teacher_tokens.long())

    def score(self, model: nn.Module, datamodule: DataModule) -> dict[str, float]:
        """Held-out (test split) perplexity of a standalone model (e.g. the exported int8 student)."""
        return {"test_ppl": perplexity(model, datamodule.test_dataloader())}

    def export_onnx(self, model: nn.Module, datamodule: DataModule, path: Path) -> None:
        """A decoder step with a KV cache: it scores (empty past) and generates."""
        export_decoder(model, path)

    def export_extras(
        self, student: nn.Module, teacher: nn.Module | None, datamodule: LanguageModelData, output_dir: Path
    ) -> dict[str, float]:
        """Greedy responses to held-out prompts, the student's and the teacher's side by side, scored by
        ROUGE-L against the data's reference (the text's true continuation, or the teacher's stored
        response); perplexity on the data's extra held-out loaders (e.g. the corpus of a prompt pool)."""
        pairs = datamodule.reference_prompts("test", self.samples, self.prompt_tokens, self.new_tokens)
        decode = partial(datamodule.tokenizer.decode, skip_special_tokens=True)
        rows = [{"prompt": decode(prompt), "reference": decode(reference)} for prompt, reference in pairs]
        metrics = {}
        # Where the references are the teacher's own greedy responses, its score is 100 by construction.
        teacher = None if datamodule.references_are_teachers else teacher
        for name, model in (("student", student), ("teacher", teacher)):
            if model is None:
                continue
            started = time.perf_counter()
            responses = greedy_responses(model, datamodule.tokenizer, [prompt for prompt, _ in pairs], self.new_tokens)
            metrics[f"{name}/greedy_tokens_per_s"] = sum(map(len, responses)) / (time.perf_counter() - started)
            for row, response in zip(rows, responses, strict=True):
                row[name] = decode(response)
            metrics[f"{name}/rougeL"] = 100 * sum(rouge_l(row[name], row["reference"]) for row in rows) / len(rows)
        for loader_name, loader in datamodule.extra_test_loaders().items():
            metrics[f"student/{loader_name}_test_ppl"] = perplexity(student, loader)
        if self.gguf:
            gguf_dir = output_dir / "student_gguf"
            metrics |= run_ggufs(student, datamodule.tokenizer, gguf_dir, self.gguf, datamodule.test_dataloader())
        write_json(output_dir / "generations.json", {"samples": rows, **metrics})
        return metrics

    def summary(self, results: dict[str, float]) -> dict[str, Any]:
        return {"teacher/test_ppl": results.get("test/teacher_ppl"), "student/test_ppl": results["test/ppl"]}
