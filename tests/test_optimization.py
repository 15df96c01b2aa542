"""The student's optimizer: weight decay on weights only, the schedule, and the fused update by default."""

from functools import partial

import pytest
import torch
from torch import nn

from distill.modules.optimization import optimizer_with_schedule


def student() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 3))


def optimizer(factory, model: nn.Module, **settings) -> torch.optim.Optimizer:
    answer = optimizer_with_schedule(factory, list(model.named_parameters()), 0.25, 8, **settings)
    return answer["optimizer"]


def test_biases_and_norms_take_no_weight_decay_and_the_schedule_warms_up_then_decays_to_zero():
    model = student()
    model[1].weight.requires_grad_(False)  # frozen parameters are not optimized
    answer = optimizer_with_schedule(
        partial(torch.optim.AdamW, lr=1.0, weight_decay=0.1), [("norm.weight", model[1].weight)]
        + [(f"layer.{name}", param) for name, param in model[0].named_parameters()], 0.25, 8,
    )  # fmt: skip
    decay, no_decay = answer["optimizer"].param_groups
    assert [param.shape for param in decay["params"]] == [(8, 8)] and decay["weight_decay"] == 0.1
    assert [param.shape for param in no_decay["params"]] == [(8,)] and no_decay["weight_decay"] == 0.0
    scheduler = answer["lr_scheduler"]["scheduler"]
    rates = []
    for _ in range(8):
        rates.append(scheduler.get_last_lr()[0])
        answer["optimizer"].step()
        scheduler.step()
    assert rates[:3] == [0.0, 0.5, 1.0] and rates[-1] == pytest.approx(1 / 6) and scheduler.get_last_lr()[0] == 0.0


def test_adamw_on_cpu_is_fused_by_default_and_updates_as_the_per_tensor_loop_does():
    fused, looped = student(), student()
    fused_optimizer = optimizer(partial(torch.optim.AdamW, lr=1e-2), fused)
    looped_optimizer = optimizer(partial(torch.optim.AdamW, lr=1e-2, foreach=False), looped)
    assert fused_optimizer.defaults["fused"] is True and not looped_optimizer.defaults["fused"]
    batch = torch.randn(4, 8)
    for model, chosen in ((fused, fused_optimizer), (looped, looped_optimizer)):
        for _ in range(3):
            model(batch).square().mean().backward()
            chosen.step()
            chosen.zero_grad()
    for mine, theirs in zip(fused.parameters(), looped.parameters(), strict=True):
        torch.testing.assert_close(mine, theirs)


@pytest.mark.parametrize(
    ("factory", "settings"),
    [
        (partial(torch.optim.AdamW, foreach=True), {}),  # the user's choice stands
        (partial(torch.optim.AdamW, fused=False), {}),
        (partial(torch.optim.AdamW), {"may_fuse": False}),  # mixed precision: Lightning unscales, then clips
        (partial(torch.optim.RMSprop), {}),  # no fused variant in torch
    ],
)
def test_the_fused_update_is_left_out_where_the_user_or_the_precision_rules_it_out(factory, settings):
    chosen = optimizer(factory, student(), **settings)
    assert not chosen.defaults.get("fused")


def test_parameters_on_the_meta_device_keep_torchs_default():
    with torch.device("meta"):
        model = nn.Linear(4, 4)
    assert not optimizer(partial(torch.optim.AdamW), model).defaults["fused"]
