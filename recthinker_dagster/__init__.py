"""RecThinker: an agentic, tool-using LLM recommender as a Dagster-orchestrated pipeline.

Domain packages (``data``, ``protocol``, ``quality``, ``models``) take plain values and
paths and know nothing of Dagster, MLflow or DVC; ``defs`` wires them into the
orchestrator, versions their outputs with DVC and logs them to MLflow.
"""

import os

# Spinning OpenMP threads starve each other on a busy 2-core machine (up to 10x slower
# decoding); passive waiting must be set before torch is imported, hence here.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
