"""Serving the trained agent: load it once, rank candidates per request, package it for MLflow.

- ``agent``: :class:`~recthinker_dagster.serving.agent.RecThinkerAgent` (domain code: no
  Dagster, MLflow or DVC) loads the base model, merges the LoRA adapters in order, loads the
  tool indexes and ranks requests with the real agent loop.
- ``promotion``: :func:`~recthinker_dagster.serving.promotion.decide_promotion`, the pure
  champion/challenger rule.
- ``pyfunc``: the MLflow ``PythonModel`` and ``log_agent_model`` (logs and registers it).
- ``registry``: ``apply_promotion`` / ``champion_metrics`` on the MLflow Model Registry.

Nothing is imported here, so importing the package stays cheap and MLflow-free.
"""
