"""Batch arithmetic, sample windows, freezing patterns, optimizer groups and the LR schedule."""

import math

import numpy as np
import pytest

from launcher.batches import ARRAY_ORDER_MAX, BatchLayout, epoch_order, order_kind, rank_micro_batches, step_window
from launcher.config import TrainConfig
from launcher.errors import UsageError
from launcher.freezing import apply_freeze, frozen_names, parameter_table
from launcher.models import GPT
from launcher.optim import build_optimizer, lr_factor


def test_global_batch_and_steps():
    plan = BatchLayout(micro_batch_size=4, gradient_accumulation_steps=3, world_size=2)
    assert plan.global_batch_size == 24
    assert plan.steps_per_epoch(48) == 2
    assert plan.steps_per_epoch(49) == 3  # the last step is a partial window of 1 sample
    assert plan.total_steps(49, max_steps=None, epochs=2) == 6
    assert plan.total_steps(49, max_steps=4, epochs=2) == 4


@pytest.mark.parametrize("split", [(1, 1, 8), (1, 8, 1), (2, 1, 4), (2, 2, 2), (4, 2, 1), (8, 1, 1)])
def test_each_window_is_split_over_ranks_and_micro_steps_without_loss_or_duplicate(split):
    world, micro, accumulation = split
    plan = BatchLayout(micro, accumulation, world)
    order = epoch_order(21, seed=3, epoch=1, shuffle=True)
    assert sorted(order) == list(range(21))
    for step in range(plan.steps_per_epoch(21)):  # 8, 8, then a partial window of 5
        window = step_window(order, step, plan.global_batch_size)
        parts = [rank_micro_batches(window, rank, plan) for rank in range(world)]
        assert all(len(p) == accumulation for p in parts)  # same number of micro-steps on every rank
        assert all(len(mb) <= micro for p in parts for mb in p)
        taken = np.concatenate([mb for p in parts for mb in p])
        assert sorted(taken) == sorted(window)


def test_epoch_order_depends_on_seed_and_epoch_only():
    a = epoch_order(100, seed=0, epoch=0, shuffle=True)
    assert np.array_equal(a, epoch_order(100, seed=0, epoch=0, shuffle=True))
    assert not np.array_equal(a, epoch_order(100, seed=0, epoch=1, shuffle=True))
    assert not np.array_equal(a, epoch_order(100, seed=1, epoch=0, shuffle=True))
    assert np.array_equal(epoch_order(5, seed=0, epoch=3, shuffle=False), np.arange(5))


@pytest.mark.parametrize("n", [1, 2, 3, 5, 64, 65, 1000, 4097, 65_537])
def test_keyed_order_is_a_permutation_of_every_size(n):
    order = epoch_order(n, seed=7, epoch=2, shuffle=True, kind="keyed")
    whole = order[0:n]
    assert sorted(whole.tolist()) == list(range(n))
    assert np.array_equal(np.concatenate([order[a : a + 10] for a in range(0, n, 10)]), whole)  # a step's slice alone
    assert np.array_equal(epoch_order(n, seed=0, epoch=0, shuffle=False, kind="keyed")[0:n], np.arange(n))
    if n >= 64:
        assert not np.array_equal(whole, np.arange(n))  # shuffled
    if n >= 1000:  # no trace of the original order: a random permutation's correlation is about 1/sqrt(n)
        assert np.abs(np.corrcoef(np.arange(n), whole)[0, 1]) < 4 / math.sqrt(n)


def test_keyed_order_depends_on_seed_and_epoch_only_and_holds_nothing_per_sample():
    n = 3_000_000_000  # rows of about 770 B tokens: a window costs its own length
    a = epoch_order(n, seed=0, epoch=0, shuffle=True, kind="keyed")
    window = a[512:1024]
    assert np.array_equal(window, epoch_order(n, seed=0, epoch=0, shuffle=True, kind="keyed")[512:1024])
    assert len(np.unique(window)) == 512 and window.min() >= 0 and window.max() < n
    assert not np.array_equal(window, epoch_order(n, seed=0, epoch=1, shuffle=True, kind="keyed")[512:1024])
    assert not np.array_equal(window, epoch_order(n, seed=1, epoch=0, shuffle=True, kind="keyed")[512:1024])
    assert a.keys.nbytes == 48  # all it holds
    assert order_kind(ARRAY_ORDER_MAX) == "array" and order_kind(ARRAY_ORDER_MAX + 1) == "keyed"


def small_gpt():
    return GPT(vocab_size=11, seq_len=8, n_layer=2, n_head=2, d_model=8)


def test_glob_and_regex_patterns():
    model = small_gpt()
    assert frozen_names(model, ["blocks.0.*"]) == {n for n, _ in model.named_parameters() if n.startswith("blocks.0.")}
    assert frozen_names(model, ["re:blocks\\.[01]\\.qkv\\.weight"]) == {"blocks.0.qkv.weight", "blocks.1.qkv.weight"}


def test_regex_must_match_the_whole_name():
    with pytest.raises(UsageError, match="'re:qkv' matches no parameter"):
        frozen_names(small_gpt(), ["re:qkv"])


def test_pattern_matching_nothing_names_the_closest_parameters():
    with pytest.raises(UsageError) as err:
        frozen_names(small_gpt(), ["blocks.0.qkv.weights", "tok_embed.*"])
    assert len(err.value.lines) == 1
    assert "'blocks.0.qkv.weights' matches no parameter; closest names: blocks.0.qkv.weight" in err.value.lines[0]


def test_freezing_everything_is_an_error():
    with pytest.raises(UsageError, match="freeze all"):
        frozen_names(small_gpt(), ["*"])


def test_optimizer_gets_trainable_parameters_only_and_no_decay_on_biases_and_norms():
    model = small_gpt()
    frozen = apply_freeze(model, ["tok_embed.*", "blocks.1.*"])
    optimizer = build_optimizer(model, TrainConfig(weight_decay=0.1))
    in_optimizer = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    for name, param in model.named_parameters():
        if name in frozen:
            assert not param.requires_grad and id(param) not in in_optimizer, name
        else:
            assert in_optimizer[id(param)] == (0.1 if param.ndim >= 2 else 0.0), name
    table = parameter_table(model)
    assert "tok_embed" in table.splitlines()[1] and table.splitlines()[-1].startswith("total")


def test_lr_schedule_counts_optimizer_steps():
    cfg = TrainConfig(learning_rate=1.0, warmup_steps=4, lr_schedule="cosine", min_lr_ratio=0.1, max_steps=10)
    factors = [lr_factor(step, 10, cfg) for step in range(10)]
    assert factors[:4] == [0.2, 0.4, 0.6, 0.8]
    assert factors[4] == 1.0
    assert factors[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 5 / 6)))
    linear = TrainConfig(lr_schedule="linear", min_lr_ratio=0.0, max_steps=10)
    assert lr_factor(10, 10, linear) == 0.0
    assert lr_factor(7, 10, TrainConfig(lr_schedule="constant", max_steps=10)) == 1.0


def test_a_checkpoint_names_its_backend_by_kind_and_older_ones_by_their_display_name():
    from launcher.backends import BackendKind

    assert BackendKind.of_checkpoint("fsdp2", "anything") is BackendKind.FSDP2
    # written before backend_kind was recorded: only the display name
    assert BackendKind.of_checkpoint(None, "DeepSpeed ZeRO-2") is BackendKind.DEEPSPEED
    assert BackendKind.of_checkpoint(None, "FSDP2 (gloo)") is BackendKind.FSDP2
    assert BackendKind.of_checkpoint(None, "DDP (gloo)") is BackendKind.DDP
    assert BackendKind.of_checkpoint(None, "single process") is BackendKind.DDP
