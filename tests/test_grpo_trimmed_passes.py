"""GRPO's log-prob passes without their all-padding columns (``trim_padding``), and passes
that run each group's shared prompt once (``shared_prompts``), give the padded passes'
log-probs, entropies and gradients, with the answer constraint and the trained-token mask,
chunk by chunk, and run narrower inputs."""

from __future__ import annotations

import pytest
import torch

from recthinker_dagster.training.grpo_trainer import ConstrainedAnswerGRPOTrainer

PAD = 0
PROMPTS = (9, 6, 9, 4)  # real prompt tokens per row (left-padded to 9)
COMPLETIONS = (5, 12, 4, 3)  # real completion tokens per row (right-padded to 12)


def _trainer(trim_padding: bool, shared_prompts: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    model = LlamaForCausalLM(config).eval()
    trainer = ConstrainedAnswerGRPOTrainer.scoring_only(model, trim_padding=trim_padding, shared_prompts=shared_prompts)
    # every sampled completion token is trained but the second one of each row (a tool result, say)
    trainer.receive_trained_masks([[int(i != 1) for i in range(n)] for n in COMPLETIONS])
    # the last real completion token of rows 0 and 1 was drawn among three allowed ids
    trainer.receive_answer_constraints([[None] * (n - 1) + [[7, 8, 9]] if r < 2 else [None] * n
                                        for r, n in enumerate(COMPLETIONS)])
    return trainer, model


def _batch():
    generator = torch.Generator().manual_seed(1)
    width = max(PROMPTS) + max(COMPLETIONS)
    ids = torch.full((len(PROMPTS), width), PAD)
    mask = torch.zeros_like(ids)
    for row, (prompt, completion) in enumerate(zip(PROMPTS, COMPLETIONS)):
        start, end = max(PROMPTS) - prompt, max(PROMPTS) + completion
        ids[row, start:end] = torch.randint(10, 64, (end - start,), generator=generator)
        mask[row, start:end] = 1
    for row in (0, 1):  # the constrained answer token is one of its allowed ids
        ids[row, max(PROMPTS) + COMPLETIONS[row] - 1] = 8
    return ids, mask, max(COMPLETIONS)


def _widths(model) -> tuple[list[int], object]:
    """The input widths of every forward of ``model``'s backbone from now on, and the hook to remove."""
    widths: list[int] = []
    hook = model.model.register_forward_pre_hook(lambda module, args, kwargs: widths.append(kwargs["input_ids"].shape[1]),
                                                 with_kwargs=True)
    return widths, hook


def _as_padded(ids, mask, keep, batch_size, **options):
    """The log-probs and entropies of a pass without gradient by a trainer with ``options``, checked
    against TRL's padded pass on the same weights (seeded; each model filters its trainer's
    labels), and the input widths of that trainer's forwards."""
    padded, padded_model = _trainer(trim_padding=False)
    trainer, model = _trainer(**options)
    widths, hook = _widths(model)
    with torch.no_grad():
        expected = padded._get_per_token_logps_and_entropies(padded_model, ids, mask, keep, batch_size=batch_size,
                                                             compute_entropy=True)
        got = trainer._get_per_token_logps_and_entropies(model, ids, mask, keep, batch_size=batch_size,
                                                         compute_entropy=True)
    hook.remove()
    for want, have in zip(expected[:2], got[:2]):
        assert have.shape == want.shape == (len(PROMPTS), keep)
        torch.testing.assert_close(have, want, atol=1e-5, rtol=1e-5)
    return got, widths


@pytest.mark.parametrize("batch_size", [None, 2])
def test_trimmed_passes_give_the_padded_passes_log_probs_and_entropies(batch_size):
    ids, mask, keep = _batch()
    got, widths = _as_padded(ids, mask, keep, batch_size, trim_padding=True)
    real = torch.tensor([[i < n for i in range(keep)] for n in COMPLETIONS])
    assert (got[0][real] != 0).any() and (got[0][~real] == 0).all()
    assert got[0][0, COMPLETIONS[0] - 1] > torch.log(torch.tensor(1 / 3)) - 1  # scored among 3 ids, not 64
    full = ids.shape[1]
    if batch_size is None:  # one pass: only row 1 reaches the last column, every row the first
        assert widths == [full]
    else:  # rows 0-1 span every prompt column and row 1's whole completion; rows 2-3 lack 8 of them
        assert widths == [full, max(PROMPTS) + max(COMPLETIONS[2:])]


@pytest.mark.parametrize("batch_size", [None, 1])
def test_a_pass_without_gradient_runs_each_shared_prompt_once_with_the_same_log_probs(batch_size):
    ids, mask, keep = _batch()
    prompt_width = max(PROMPTS)
    for row, source in ((1, 0), (3, 2)):  # two groups of two rollouts, each group sharing its prompt, as GRPO's
        ids[row, :prompt_width], mask[row, :prompt_width] = ids[source, :prompt_width], mask[source, :prompt_width]
    got, widths = _as_padded(ids, mask, keep, batch_size, trim_padding=True, shared_prompts=True)
    assert got[0][0, COMPLETIONS[0] - 1] > torch.log(torch.tensor(1 / 3)) - 1  # scored among 3 ids, not 64
    # each prompt but its last token once (9 and 9 tokens), then that token plus the completions
    if batch_size is None:
        assert widths == [8, 1 + max(COMPLETIONS[:2]), 8, 1 + max(COMPLETIONS[2:])]
    else:
        # a group's rows shortest first: chunks of alike lengths
        assert widths == [8, *(1 + n for n in sorted(COMPLETIONS[:2])), 8, *(1 + n for n in sorted(COMPLETIONS[2:]))]


def test_a_loss_pass_runs_each_shared_prompt_once_with_the_padded_passes_gradient():
    ids, mask, keep = _batch()
    prompt_width = max(PROMPTS)
    for row in (1, 2):  # rows 0-2 share row 0's prompt; row 3 has its own
        ids[row, :prompt_width], mask[row, :prompt_width] = ids[0, :prompt_width], mask[0, :prompt_width]
    weights = torch.linspace(0.5, 2.0, keep)  # a loss that weighs each position differently
    gradients, logps = [], []
    for options in ({"trim_padding": False}, {"trim_padding": True, "shared_prompts": True}):
        trainer, model = _trainer(**options)
        trainer._loss_trained = torch.tensor([[i < n and i != 1 for i in range(keep)] for n in COMPLETIONS])
        trainer._loss_allowed = trainer._allowed_for(len(PROMPTS), keep)
        trainer._batch_constraints = None  # a loss pass reads its micro-batch's tables (as _compute_loss sets them)
        widths, hook = _widths(model)
        got, entropies, _ = trainer._get_per_token_logps_and_entropies(model, ids, mask, keep, compute_entropy=True)
        hook.remove()
        ((got * weights).sum() + entropies.sum()).backward()
        logps.append(got.detach())
        gradients.append([parameter.grad for parameter in model.parameters()])
    torch.testing.assert_close(logps[1], logps[0], atol=1e-5, rtol=1e-5)
    for shared, padded in zip(*reversed(gradients)):
        torch.testing.assert_close(shared, padded, atol=1e-5, rtol=1e-5)
    # the last widths are the shared trainer's: each prompt but its last token once, its rows after it
    assert widths == [prompt_width - 1, 1 + max(COMPLETIONS[:3]), PROMPTS[3] - 1, 1 + COMPLETIONS[3]]


def test_a_loss_micro_batch_is_trimmed_to_its_own_rows():
    ids, mask, keep = _batch()
    trimmed, model = _trainer(trim_padding=True)
    trimmed._loss_trained = torch.ones(2, keep, dtype=torch.bool)  # as _compute_loss sets it for its rows
    trimmed._loss_allowed = None
    widths, hook = _widths(model)
    logps, _, _ = trimmed._get_per_token_logps_and_entropies(model, ids[2:], mask[2:], keep)
    hook.remove()
    assert logps.shape == (2, keep) and widths == [max(PROMPTS) + max(COMPLETIONS[2:])]
    logps.sum().backward()  # the trimmed pass keeps the graph


def test_padding_share_is_the_padding_of_trls_layout():
    from recthinker_dagster.training.grpo import padding_share

    # prompts padded to 3, completions to 4: 2 rows x 7 positions, 3 + 2 + 2 + 4 = 11 real
    assert padding_share([[1, 2, 3], [1, 2]], [[4, 5], [4, 5, 6, 7]]) == pytest.approx(1 - 11 / 14)
    assert padding_share([[1, 2]], [[3]]) == 0.0
    assert padding_share([], []) == 0.0


def test_micro_batches_are_regrouped_by_prompt_with_every_row_kept():
    from recthinker_dagster.training.grpo_trainer import micro_batches_by_prompt

    prompts = torch.tensor([[0, 5, 6], [7, 8, 9], [0, 5, 6], [7, 8, 9], [0, 0, 4], [0, 5, 6]])
    mask = (prompts != 0).long()
    completion_mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 0, 0], [1, 1, 0], [1, 1, 1], [1, 1, 0]])
    batch = {"prompt_ids": prompts, "prompt_mask": mask, "completion_mask": completion_mask,
             "advantages": torch.arange(6.0), "texts": list("abcdef"), "num_items_in_batch": torch.tensor(6),
             "pixel_values": None}
    rows = ("prompt_ids", "prompt_mask", "completion_mask", "advantages", "texts")
    shuffled = [{key: value[i:i + 2] if key in rows else value for key, value in batch.items()}
                for i in (0, 2, 4)]  # TRL's split, three micro-batches of 2
    regrouped = micro_batches_by_prompt(shuffled)
    assert [len(part["texts"]) for part in regrouped] == [2, 2, 2]
    # rows in order of their prompt's first appearance, each prompt's rows shortest completion first
    assert [text for part in regrouped for text in part["texts"]] == list("cfabde")
    assert torch.cat([part["advantages"] for part in regrouped]).tolist() == [2.0, 5.0, 0.0, 1.0, 3.0, 4.0]
    assert all(part["num_items_in_batch"] == 6 and part["pixel_values"] is None for part in regrouped)
    for part in regrouped:  # each row still carries its own prompt
        for text, ids in zip(part["texts"], part["prompt_ids"]):
            assert torch.equal(ids, prompts["abcdef".index(text)])
