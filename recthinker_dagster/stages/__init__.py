"""Stage functions: one per pipeline stage, free of Dagster, MLflow and DVC.

Each takes typed settings (``recthinker_dagster.settings``), an
:class:`~recthinker_dagster.artifacts.ArtifactLayout` and the dataset(s), reads its inputs
from the published artifacts, writes its own folder atomically and returns a typed result
holding :class:`~recthinker_dagster.stages.result.StageArtifact` (the folder and its figures)
plus whatever the next stage needs. Dagster assets (``recthinker_dagster.defs``) and the
scripts under ``scripts/`` are thin wrappers over these functions.
"""
