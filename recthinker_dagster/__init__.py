"""RecThinker: an agentic, tool-using LLM recommender as a Dagster-orchestrated pipeline.

Domain packages (``data``, ``protocol``, ``quality``, ``models``) take plain values and
paths and know nothing of Dagster, MLflow or DVC; ``defs`` wires them into the
orchestrator, versions their outputs with DVC and logs them to MLflow.
"""

__version__ = "0.1.0"
