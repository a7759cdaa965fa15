"""TRL's ``GRPOTrainer`` scoring answer tokens under the sampler's answer constraint.

The rollout function (``grpo.ToolRollout``) hands the trainer, for each rollout of a
generation batch, the ids the answer constraint allowed at each completion position
(``receive_answer_constraints``). Every log-prob the trainer computes from then on (the
reference model's for the KL, the policy's for the loss) is taken among those ids at the
constrained positions (``answer_logprobs.py``); the table rides along with the batch through
TRL's shuffling and micro-batching as the ``answer_allowed`` tensor. Without constraints
(HTTP backends, unconstrained recipes) this is TRL's trainer unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from trl import GRPOTrainer

from recthinker_dagster.training.answer_logprobs import allowed_table, constrained_positions, restrict_logprobs

ALLOWED_KEY = "answer_allowed"


class ConstrainedAnswerGRPOTrainer(GRPOTrainer):
    _batch_constraints: list | None = None  # this generation batch's rows, in rollout order
    _loss_allowed = None  # the micro-batch's table while its loss is computed

    def receive_answer_constraints(self, rows: Sequence[Sequence[Sequence[int] | None]] | None) -> None:
        self._batch_constraints = list(rows) if rows is not None else None

    def _generate_and_score_completions(self, inputs):
        self._batch_constraints = None
        try:
            output = super()._generate_and_score_completions(inputs)
            if self._batch_constraints is not None:
                output[ALLOWED_KEY] = allowed_table(self._batch_constraints, output["completion_ids"].shape[1]).to(
                    output["completion_ids"].device)
        finally:
            self._batch_constraints = None
        return output

    def _compute_loss(self, model, inputs):
        self._loss_allowed = inputs.get(ALLOWED_KEY)
        try:
            return super()._compute_loss(model, inputs)
        finally:
            self._loss_allowed = None

    def _allowed_for(self, rows: int, width: int):
        if self._loss_allowed is not None:
            return self._loss_allowed
        if self._batch_constraints is not None and len(self._batch_constraints) == rows:
            return allowed_table(self._batch_constraints, width)
        return None

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        allowed = self._allowed_for(input_ids.shape[0], logits_to_keep)
        if allowed is None or constrained_positions(allowed)[0].numel() == 0:
            return super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep,
                                                             *args, **kwargs)
        causal_lm = self.accelerator.unwrap_model(model)
        if hasattr(causal_lm, "get_base_model"):  # PEFT
            causal_lm = causal_lm.get_base_model()
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
                                  allowed.to(logps.device), self.temperature)
        return logps, entropies, aux
