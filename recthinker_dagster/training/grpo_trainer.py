"""TRL's ``GRPOTrainer`` scoring answer tokens under the sampler's answer constraint.

The rollout function (``grpo.ToolRollout``) hands the trainer, for each rollout of a
generation batch, the ids the answer constraint allowed at each completion position
(``receive_answer_constraints``). Every log-prob the trainer computes from then on (the
reference model's for the KL, the policy's for the loss) is taken among those ids at the
constrained positions (``answer_logprobs.py``); the table rides along with the batch through
TRL's shuffling and micro-batching as the ``answer_allowed`` tensor. Without constraints
(HTTP backends, unconstrained recipes) this is TRL's trainer unchanged. With an
``answer_temperature`` (the recipe's; the sampler drew the labels at it) the constrained
positions are scored at that temperature, the rest at TRL's. In the ``logits`` answer mode the
rollout also hands over each label's head draw (``receive_head_draws``): those positions are
scored as Plackett–Luce terms from the answer's first label position
(``answer_logprobs.head_draw_logprobs``), as the sampler drew them.

The LM head is projected only on the tokens the policy sampled (``scored_head.py``): the rollout
also hands over its ``env_mask`` rows (``receive_trained_masks``), and every log-prob pass (the
reference's, the policy's) turns the other completion positions' labels to -100. Their
log-probs are 0; the loss, the KL and the metrics never read them (TRL masks them out).

Flat groups. TRL calls a group flat when its float32 reward std ``isclose`` to 0 (absolute
tolerance 1e-8), but the std of eight identical rewards of 1.2 (1.0 + 0.1 + 0.1) is 1.3e-7 in
float32, so a group of equal rewards counted as varied: ``frac_reward_zero_std`` read 0 and the
group's advantages were round-off divided by 1e-4. Here a group is flat when its weighted
rewards (float64) differ by at most ``FLAT_TOLERANCE``; ``frac_reward_zero_std`` is the share
of such groups and their advantages are exactly 0.

Padding. TRL pads a generation batch to one width (prompts on the left, completions on the
right) and runs every log-prob pass at it, so a short rollout beside a long one costs the long
one's length. With ``trim_padding`` each pass (the reference's chunks, each loss micro-batch)
drops the columns that are padding in all of its rows first, and hands back log-probs (0 on
the dropped positions, as on any padding) at the full width. The real tokens' log-probs are the
same up to round-off: the attention never saw the padding, and the rotary positions move by one
offset for the whole row, which leaves the attention scores as they were. With micro-batches of
one rollout (``per_device_train_batch_size: 1``) no padding is left at all, so the model runs
its causal attention without a mask: on CPU, SDPA given a mask does not skip the blocks above
the diagonal as its causal path does (``scripts/benchmark_grpo_padding.py``, docs/training.md).

Shared prompts. A group's rollouts share their prompt (the task's opening turns, most of a
rollout's tokens), and no pass need compute it once per rollout. With ``shared_prompts`` each
pass (the reference's chunks, each loss micro-batch) runs each distinct prompt of its rows but
its last token once, keeps its KV, and then scores the rows (chunk by chunk, without their
all-padding columns) as the prompt's last token plus their completion, attending to that KV.
The log-probs are the padded pass's up to round-off, as with ``trim_padding``. In a loss pass
the KV keeps its graph, so the gradient reaches the adapter through the prompt once per
distinct prompt, summed over its rows: the padded pass's gradient. The saving there grows with
the rows of one prompt in a micro-batch (TRL shuffles the batch before it splits it), so it
wants micro-batches of several rollouts (``per_device_train_batch_size``).

Per-token advantages. With ``non_answer_weight`` below 1 (the recipe's), each rollout's
advantage weighs 1 at the answer's constrained positions and ``non_answer_weight`` at its
other sampled tokens (analysis, tool calls): the step moves the ranking, where a group's
rollouts mostly differ, more than the calls. With ``answer_credit: until_target`` the tokens
sampled after the answer placed the target get advantage 0: the reward was settled there
(``grpo.ToolRollout.answer_replay``, handed over by ``receive_settled_positions``), so
their share of the advantage is noise. Both are TRL's ``(rows, positions)`` advantages; the
KL term is not weighted.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager, nullcontext

import torch
from trl import GRPOTrainer

from recthinker_dagster.training.answer_logprobs import (
    allowed_table,
    constrained_mask,
    constrained_positions,
    head_draw_logprobs,
    head_draw_tables,
    restrict_logprobs,
)
from recthinker_dagster.training.data import IGNORE_INDEX
from recthinker_dagster.training.scored_head import project_labelled_positions_only

ALLOWED_KEY = "answer_allowed"
SETTLED_KEY = "answer_settled"
DRAW_SOURCE_KEY, DRAW_GROUPS_KEY = "answer_draw_source", "answer_draw_groups"
FLAT_TOLERANCE = 1e-6  # rewards closer than this are equal (ours are sums of weights x [0, 1] terms)


def token_advantages(advantages: torch.Tensor, allowed: torch.Tensor, non_answer_weight: float = 1.0,
                     settled: torch.Tensor | None = None) -> torch.Tensor:
    """``(rows, positions)`` advantages: each row's advantage at its constrained (answer)
    positions of the ``allowed`` table, times ``non_answer_weight`` elsewhere, and 0 where
    ``settled`` (``(rows, positions)`` booleans) says the reward was already settled."""
    if advantages.dim() != 1:
        raise ValueError(f"expected one advantage per rollout, got shape {tuple(advantages.shape)}")
    answer = constrained_mask(allowed).to(advantages.device)
    weights = torch.full(answer.shape, non_answer_weight, dtype=advantages.dtype, device=advantages.device)
    weights = weights.masked_fill(answer, 1.0)
    if settled is not None:
        weights = weights.masked_fill(settled.to(advantages.device), 0.0)
    return advantages[:, None] * weights


def bool_table(rows: Sequence[Sequence[int | bool]], width: int) -> torch.Tensor:
    """``(len(rows), width)`` booleans from per-position rows (cut or right-padded with False)."""
    table = torch.zeros(len(rows), width, dtype=torch.bool)
    for r, row in enumerate(rows):
        table[r, : min(len(row), width)] = torch.tensor([bool(v) for v in row[:width]], dtype=torch.bool)
    return table


def flat_group_rows(rewards_per_func: torch.Tensor, weights: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per row of a generation batch (groups of ``group_size`` consecutive rows): whether its
    group's weighted total rewards all lie within ``FLAT_TOLERANCE``."""
    totals = (rewards_per_func.double() * weights.double().to(rewards_per_func.device)).nansum(dim=1)
    grouped = totals.view(-1, group_size)
    flat = (grouped.max(dim=1).values - grouped.min(dim=1).values) <= FLAT_TOLERANCE
    return flat.repeat_interleave(group_size)


class ConstrainedAnswerGRPOTrainer(GRPOTrainer):
    _batch_constraints: list | None = None  # this generation batch's rows, in rollout order
    _loss_allowed = None  # the micro-batch's table while its loss is computed
    _batch_trained: list | None = None  # this generation batch's env_mask rows, in rollout order
    _batch_settled: list | None = None  # this generation batch's settled-reward rows, in rollout order
    _batch_draws: list | None = None  # this generation batch's head-draw rows, in rollout order
    _loss_draws = None  # the micro-batch's (source, groups) head-draw tables while its loss is computed
    _loss_trained = None  # the micro-batch's trained-token mask while its loss is computed
    _scored = None  # the trained-token mask of the log-prob pass under way, and its next row
    _scored_row = 0
    _flat_rows: torch.Tensor | None = None  # this generation batch's rows (every process's) in a flat group
    _chunk_tables: dict | None = None  # with trim_padding: the tables of the trimmed chunk being scored
    trim_padding = shared_prompts = False  # the recipe's (``__init__``)

    def __init__(self, *args, answer_temperature: float | None = None, non_answer_weight: float = 1.0,
                 answer_credit: str = "all", trim_padding: bool = False, shared_prompts: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.non_answer_weight, self.answer_credit = non_answer_weight, answer_credit
        self.trim_padding, self.shared_prompts = trim_padding, shared_prompts
        # the answer labels' sampling temperature (SamplingParams.answer_temperature): their log-probs use it
        self.answer_temperature = answer_temperature if answer_temperature is not None else self.temperature
        for model in (self.model, self.ref_model):
            if model is not None:
                project_labelled_positions_only(model, temperature=self.temperature,
                                                label_filter=self._trained_labels_only)

    @classmethod
    def scoring_only(cls, model, *, trim_padding: bool = False, shared_prompts: bool = False,
                     autocast=nullcontext) -> ConstrainedAnswerGRPOTrainer:
        """The trainer's log-prob passes alone, on ``model`` (a causal LM or a PEFT model), with
        no training loop, dataset or accelerator: for benchmarks and tests of the passes. Both
        temperatures are 1."""
        from types import SimpleNamespace

        from trl.trainer.utils import add_fused_lm_head

        trainer = object.__new__(cls)
        trainer.trim_padding, trainer.shared_prompts = trim_padding, shared_prompts
        trainer.temperature = trainer.answer_temperature = 1.0
        trainer.accelerator = SimpleNamespace(autocast=autocast, unwrap_model=lambda m: m, is_main_process=True)
        lm = model.get_base_model() if hasattr(model, "get_base_model") else model
        add_fused_lm_head(lm, temperature=1.0, outputs=("log_probs", "entropy", "is_top1"))
        project_labelled_positions_only(model, label_filter=trainer._trained_labels_only)
        return trainer

    def receive_trained_masks(self, rows: Sequence[Sequence[int]] | None) -> None:
        self._batch_trained = list(rows) if rows is not None else None

    def receive_settled_positions(self, rows: Sequence[Sequence[bool]] | None) -> None:
        self._batch_settled = list(rows) if rows is not None else None

    def receive_head_draws(self, rows: Sequence[Sequence] | None) -> None:
        self._batch_draws = list(rows) if rows is not None else None

    def receive_answer_constraints(self, rows: Sequence[Sequence[Sequence[int] | None]] | None) -> None:
        self._batch_constraints = list(rows) if rows is not None else None

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        group_size = self.num_generations if self.model.training else self.num_generations_eval  # as TRL groups them
        self._flat_rows = flat_group_rows(rewards_per_func, self.reward_weights, group_size)
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        self._batch_constraints = self._batch_trained = self._batch_settled = self._flat_rows = None
        self._batch_draws = None
        try:
            output = super()._generate_and_score_completions(inputs)
            width, device = output["completion_ids"].shape[1], output["completion_ids"].device
            if self._batch_constraints is not None:
                output[ALLOWED_KEY] = allowed_table(self._batch_constraints, width).to(device)
            if self._batch_draws is not None and any(d is not None for row in self._batch_draws for d in row):
                output[DRAW_SOURCE_KEY], output[DRAW_GROUPS_KEY] = (
                    table.to(device) for table in head_draw_tables(self._batch_draws, width))
            if self._batch_settled is not None and self.answer_credit == "until_target":
                output[SETTLED_KEY] = bool_table(self._batch_settled, width).to(device)
            if self._flat_rows is not None:
                self._zero_flat_groups(output, self._flat_rows)
        finally:
            self._batch_constraints = self._batch_trained = self._batch_settled = self._flat_rows = None
        self._batch_draws = None
        return output

    def _prepare_inputs(self, generation_batch):
        """TRL's, and with ``shared_prompts`` a new generation batch's micro-batches regrouped so
        that each holds as few prompts as it can (``micro_batches_by_prompt``)."""
        buffered = self._buffered_inputs
        inputs = super()._prepare_inputs(generation_batch)
        if self.shared_prompts and self.model.training and self._buffered_inputs is not buffered:
            self._buffered_inputs = micro_batches_by_prompt(self._buffered_inputs)
            inputs = self._buffered_inputs[self._step % self.args.steps_per_generation]
        return inputs

    def _zero_flat_groups(self, output: dict, flat_rows: torch.Tensor) -> None:
        """Log the share of flat groups as ``frac_reward_zero_std`` (replacing TRL's figure for
        this batch) and give their rows advantage 0 (module docstring)."""
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["frac_reward_zero_std"][-1] = flat_rows.float().mean().item()
        local = output["advantages"].shape[0]
        start = self.accelerator.process_index * local
        mine = flat_rows[start:start + local].to(output["advantages"].device)
        output["advantages"] = output["advantages"].masked_fill(mine, 0.0)

    def _compute_loss(self, model, inputs):
        self._loss_allowed = inputs.get(ALLOWED_KEY)
        self._loss_draws = (inputs[DRAW_SOURCE_KEY], inputs[DRAW_GROUPS_KEY]) if DRAW_SOURCE_KEY in inputs else None
        trained = inputs["completion_mask"]
        self._loss_trained = (trained * inputs["tool_mask"] if "tool_mask" in inputs else trained).bool()
        if self.non_answer_weight != 1.0 or self.answer_credit != "all":
            if self._loss_allowed is None or (self.answer_credit != "all" and SETTLED_KEY not in inputs):
                raise RuntimeError("non_answer_weight and answer_credit need the answer constraint's positions, and "
                                   "this batch has none (a rollout server, or constrain_answers off): set "
                                   "non_answer_weight to 1 and answer_credit to 'all'")
            inputs = {**inputs, "advantages": token_advantages(inputs["advantages"], self._loss_allowed,
                                                               self.non_answer_weight, inputs.get(SETTLED_KEY))}
        try:
            return super()._compute_loss(model, inputs)
        finally:
            self._loss_allowed = self._loss_trained = self._loss_draws = None

    @staticmethod
    def _pass_table(in_loss, batch_rows: list | None, build, rows: int, width: int):
        """The table of the pass under way: the loss micro-batch's (``in_loss``, shuffled with the
        batch by TRL), else one built from this generation batch's rows when the pass scores the
        whole batch, else None."""
        if in_loss is not None:
            return in_loss
        if batch_rows is not None and len(batch_rows) == rows:
            return build(batch_rows, width)
        return None

    def _allowed_for(self, rows: int, width: int):
        if self._chunk_tables is not None:
            return self._chunk_tables["allowed"]
        return self._pass_table(self._loss_allowed, self._batch_constraints, allowed_table, rows, width)

    def _draws_for(self, rows: int, width: int):
        if self._chunk_tables is not None:
            return self._chunk_tables["draws"]
        return self._pass_table(self._loss_draws, self._batch_draws, head_draw_tables, rows, width)

    def _trained_for(self, rows: int, width: int):
        if self._chunk_tables is not None:
            return self._chunk_tables["trained"]
        return self._pass_table(self._loss_trained, self._batch_trained, bool_table, rows, width)

    def _trained_labels_only(self, labels: torch.Tensor) -> torch.Tensor:
        """The fused head's labels of the next rows of this pass, -100 off the trained tokens."""
        if self._scored is None:
            return labels
        mask = self._scored[self._scored_row: self._scored_row + labels.shape[0]].to(labels.device)
        self._scored_row += labels.shape[0]
        if mask.shape[0] != labels.shape[0]:
            raise RuntimeError("the trained-token mask has fewer rows than the log-prob pass scored")
        labels = labels.clone()
        labels[:, -mask.shape[1]:] = labels[:, -mask.shape[1]:].masked_fill(~mask, IGNORE_INDEX)
        return labels

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        if self.shared_prompts and self._chunk_tables is None and not args:
            return self._shared_prompt_passes(model, input_ids, attention_mask, logits_to_keep, **kwargs)
        if self.trim_padding and self._chunk_tables is None and not args:
            return self._trimmed_passes(model, input_ids, attention_mask, logits_to_keep, **kwargs)
        self._scored, self._scored_row = self._trained_for(input_ids.shape[0], logits_to_keep), 0
        try:
            return self._logps_under_constraints(model, input_ids, attention_mask, logits_to_keep, *args, **kwargs)
        finally:
            self._scored = None

    def _pass_tables(self, rows: int, width: int) -> dict:
        """The allowed-id, head-draw and trained-token tables of a pass over ``rows`` rows."""
        return {"allowed": self._allowed_for(rows, width), "draws": self._draws_for(rows, width),
                "trained": self._trained_for(rows, width)}

    @contextmanager
    def _scoring_chunk(self, tables: dict, rows: slice | list[int], keep: int):
        """Inside, the passes score ``rows`` of ``tables`` over their first ``keep`` positions."""
        self._chunk_tables = {name: _chunk_of(table, rows, keep) for name, table in tables.items()}
        try:
            yield
        finally:
            self._chunk_tables = None

    def _trimmed_passes(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None, **kwargs):
        """TRL's pass chunk by chunk (``batch_size`` rows), each without its all-padding columns
        (module docstring), the results padded back to ``logits_to_keep`` completion positions."""
        rows, width = input_ids.shape
        tables = self._pass_tables(rows, logits_to_keep)
        logps, entropies, aux = [], [], []
        for start in range(0, rows, batch_size or rows):
            chunk = slice(start, start + (batch_size or rows))
            columns = attention_mask[chunk].any(dim=0).nonzero()
            first = min(int(columns[0]), width - logits_to_keep) if columns.numel() else 0
            end = max(int(columns[-1]) + 1, width - logits_to_keep + 1) if columns.numel() else width
            keep = logits_to_keep - (width - end)  # completion positions left after the right padding
            with self._scoring_chunk(tables, chunk, keep):
                chunk_logps, chunk_entropies, chunk_aux = self._get_per_token_logps_and_entropies(
                    model, input_ids[chunk, first:end], attention_mask[chunk, first:end], keep, **kwargs)
            logps.append(_pad_right(chunk_logps, logits_to_keep))
            if chunk_entropies is not None:
                entropies.append(_pad_right(chunk_entropies, logits_to_keep))
            if chunk_aux is not None:
                aux.append(chunk_aux)
        return (torch.cat(logps), torch.cat(entropies) if entropies else None,
                torch.stack(aux).mean() if aux else None)

    def _shared_prompt_passes(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                              compute_entropy=False, **kwargs):
        """A pass that runs each distinct prompt once (module docstring): per prompt, its KV
        without its last token, then its rows ``batch_size`` at a time as that token plus their
        completion (trimmed of trailing padding), attending to the KV. Log-probs (and entropies)
        come back at the full ``logits_to_keep`` width, in row order, with their graph when the
        pass has gradient."""
        rows, width = input_ids.shape
        prompt_width = width - logits_to_keep
        tables = self._pass_tables(rows, logits_to_keep)
        logps = input_ids.new_zeros((rows, logits_to_keep), dtype=torch.float32)
        entropies = torch.zeros_like(logps) if compute_entropy else None
        decoder = _causal_lm(self.accelerator.unwrap_model(model)).get_decoder()
        groups = rows_by_prompt(input_ids[:, :prompt_width], attention_mask[:, :prompt_width],
                                attention_mask[:, prompt_width:])  # chunks of alike lengths: less padding
        for prompt_ids, members in groups.items():
            prefix = torch.tensor([prompt_ids[:-1]], dtype=input_ids.dtype, device=input_ids.device)
            with self.accelerator.autocast():
                prefix_kv = ([(layer.keys, layer.values) for layer in
                              decoder(input_ids=prefix, use_cache=True).past_key_values.layers]
                             if prefix.shape[1] else [])
            last = input_ids.new_tensor([prompt_ids[-1]])
            for start in range(0, len(members), batch_size or len(members)):
                chunk = members[start:start + (batch_size or len(members))]  # row numbers: index any device
                completion_mask = attention_mask[chunk, prompt_width:]
                filled = completion_mask.any(dim=0).nonzero()
                keep = int(filled[-1]) + 1 if filled.numel() else 1
                ids = torch.cat([last.expand(len(chunk), 1), input_ids[chunk, prompt_width:prompt_width + keep]], dim=1)
                mask = torch.cat([completion_mask.new_ones(len(chunk), 1), completion_mask[:, :keep]], dim=1)
                with self._scoring_chunk(tables, chunk, keep), _attending_to(decoder, prefix_kv):
                    chunk_logps, chunk_entropies, _ = self._get_per_token_logps_and_entropies(
                        model, ids, mask, keep, compute_entropy=compute_entropy, **kwargs)
                logps[chunk, :keep] = chunk_logps.float()
                if entropies is not None and chunk_entropies is not None:
                    entropies[chunk, :keep] = chunk_entropies.float()
        return logps, entropies, None

    def _logps_under_constraints(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        allowed = self._allowed_for(input_ids.shape[0], logits_to_keep)
        if allowed is None or constrained_positions(allowed)[0].numel() == 0:
            return super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep,
                                                             *args, **kwargs)
        causal_lm = _causal_lm(self.accelerator.unwrap_model(model))
        hidden: list = []
        handle = causal_lm.get_decoder().register_forward_hook(
            lambda module, args_, output: hidden.append(output[0] if isinstance(output, tuple) else
                                                        output.last_hidden_state))
        try:
            logps, entropies, aux = super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, *args, **kwargs)
        finally:
            handle.remove()
        states = torch.cat(hidden, dim=0)
        logps = restrict_logprobs(logps, states, causal_lm.get_output_embeddings(), input_ids[:, -logits_to_keep:],
                                  allowed.to(logps.device), self.answer_temperature)
        draws = self._draws_for(input_ids.shape[0], logits_to_keep)
        if draws is not None:
            source, groups = (table.to(logps.device) for table in draws)
            logps = head_draw_logprobs(logps, states, causal_lm.get_output_embeddings(), source, groups,
                                       self.answer_temperature)
        return logps, entropies, aux


def rows_by_prompt(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                   completion_mask: torch.Tensor) -> dict[tuple, list[int]]:
    """Each distinct prompt (its ids under ``prompt_mask``), in order of first appearance, with
    its rows, shortest completion first (ties keep their order)."""
    lengths = completion_mask.sum(dim=1).tolist()
    groups: dict[tuple, list[int]] = {}
    for row, (ids, mask) in enumerate(zip(prompt_ids, prompt_mask)):
        groups.setdefault(tuple(ids[mask.bool()].tolist()), []).append(row)
    return {prompt: sorted(members, key=lengths.__getitem__) for prompt, members in groups.items()}


def micro_batches_by_prompt(batches: list[dict]) -> list[dict]:
    """``batches`` (TRL's micro-batches of one shuffled generation batch) re-split, as many and as
    large, after the rows were put in order of their prompt's first appearance and, within a
    prompt, of their completion's length (ties keep their shuffled order), so that a group's
    rollouts share micro-batches with rollouts of alike length (less padding). One optimizer
    step sums them all, so the order changes only how many distinct prompts and how much padding
    a pass runs."""
    from trl.trainer.utils import split_tensor_dict

    def per_row(value) -> bool:  # else split_tensor_dict hands it to every micro-batch as it is
        return isinstance(value, list) or (isinstance(value, torch.Tensor) and value.ndim > 0)

    def joined(values: list):
        if not per_row(values[0]):
            return values[0]
        return torch.cat(values) if isinstance(values[0], torch.Tensor) else [v for part in values for v in part]

    def reordered(value, order: list[int]):
        if not per_row(value):
            return value
        return value[torch.tensor(order, device=value.device)] if isinstance(value, torch.Tensor) else \
            [value[row] for row in order]

    batch = {key: joined([part[key] for part in batches]) for key in batches[0]}
    groups = rows_by_prompt(batch["prompt_ids"], batch["prompt_mask"], batch["completion_mask"])
    order = [row for members in groups.values() for row in members]
    return split_tensor_dict({key: reordered(value, order) for key, value in batch.items()}, len(batches))


def _chunk_of(table, rows: slice | list[int], keep: int):
    """Rows ``rows`` and the first ``keep`` completion positions of a ``(rows, positions)`` table
    (or of each table of a tuple); None stays None."""
    if table is None:
        return None
    if isinstance(table, tuple):
        return tuple(part[rows, :keep] for part in table)
    return table[rows, :keep]


def _pad_right(values: torch.Tensor, width: int) -> torch.Tensor:
    """``(rows, n)`` values right-padded with zeros to ``(rows, width)``."""
    return torch.nn.functional.pad(values, (0, width - values.shape[1]))


def _causal_lm(model):
    """The causal LM under a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@contextmanager
def _attending_to(decoder, prefix_kv: list):
    """Every forward of ``decoder`` inside continues after ``prefix_kv`` (one row's per-layer
    keys and values): a fresh cache holding them for each of its rows, and an attention mask
    that shows them. Without a prefix nothing changes."""
    from transformers import DynamicCache

    def continue_after_prefix(module, args, kwargs):
        ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        rows = ids.shape[0]
        kwargs["past_key_values"] = DynamicCache(ddp_cache_data=[
            (keys.expand(rows, -1, -1, -1), values.expand(rows, -1, -1, -1)) for keys, values in prefix_kv])
        mask = kwargs.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask
        kwargs["attention_mask"] = torch.cat([mask.new_ones(rows, prefix_kv[0][0].shape[2]), mask], dim=1)
        return args, kwargs

    handle = decoder.register_forward_pre_hook(continue_after_prefix, with_kwargs=True) if prefix_kv else None
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()
