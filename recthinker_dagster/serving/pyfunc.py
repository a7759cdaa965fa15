"""The agent as an MLflow pyfunc model: log it, register it, load it anywhere MLflow runs.

    import mlflow
    from recthinker_dagster.serving.pyfunc import log_agent_model

    mlflow.set_tracking_uri("sqlite:///mlflow/mlflow.db")
    version = log_agent_model(
        base_model={"path": "assets/base_model", "md5": "3f2a...dir"},       # referenced (default)
        adapters=["runs/sft/adapter"],                                      # always copied in, in order
        tool_indexes={"ml-1m": {"catalog": {"path": "assets/item_catalog/ml-1m", "md5": "..."}, ...}},
        config={"max_turns": 4, "max_new_tokens": 256},                     # serving.agent.ServingConfig
    )
    version.version                                                         # "3": a new version of recthinker-agent

    model = mlflow.pyfunc.load_model("models:/recthinker-agent@champion")
    model.predict(pandas.DataFrame([{"dataset": "ml-1m", "user_id": "10",
                                     "candidate_item_ids": ["1193", "661", "914"]}]))
    # -> columns ranking (list of item ids, best first), valid, n_tool_calls, trajectory (JSON)

Packaged vs referenced. The LoRA adapter folders (small) and the config JSON
(``agent_config.json``: serving config, artifact references, format version) are always
copied into the model. The base model and the tool index folders are *references* by
default: their path and DVC md5 are written into the config, nothing is copied. Pass
``include_base_model=True`` / ``include_tool_indexes=True`` to copy them in (needed to serve
from another machine; ``mlflow models serve`` then needs nothing but the model).

Loading a referenced folder: the recorded path, else ``$RECTHINKER_HOME/assets/<asset>[/<dataset>]``
(a moved project checkout). A folder that is missing there, or whose ``<folder>.dvc`` records
another md5 than the one logged (or is malformed), fails with an error naming the artifact, where it was
expected and the command ``recthinker restore <asset>/<dataset> <md5>`` that brings the logged
version back from DVC. References are checked before the (slow) model load.

Code: ``include_code=True`` (default) copies the ``recthinker_dagster`` package into the
model (``code_paths``), so ``mlflow models serve --env-manager local`` imports the exact code
the model was logged with; ``pip_requirements`` pins only the libraries the agent needs.

``log_agent_model`` gives the model an input example and an explicit signature. MLflow would
validate the example by loading the model and running the agent on it (slow for real models);
``validate_serving_input=False`` (default) skips that.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types.schema import AnyType, Array, ColSpec, DataType, Schema

from recthinker_dagster.artifacts import INDEX_ASSETS, DvcPointerError, tracked_md5
from recthinker_dagster.serving.agent import (
    REQUEST_KEYS,
    RESULT_KEYS,
    AgentBundle,
    ServingConfig,
)

DEFAULT_MODEL_NAME = "recthinker-agent"
MODEL_ARTIFACT_NAME = "agent"  # the model's folder inside the run
CONFIG_ARTIFACT = "agent_config"
CONFIG_FILE = "agent_config.json"
FORMAT_VERSION = 1
BASE_MODEL_ASSET = "base_model"
HOME_ENV = "RECTHINKER_HOME"
REQUIREMENTS = ("mlflow", "cloudpickle", "torch", "transformers", "peft", "trl", "polars", "numpy", "pandas",
                "pyyaml")
PACKAGE_DIR = Path(__file__).resolve().parents[1]  # recthinker_dagster/

INPUT_SCHEMA = Schema([
    ColSpec(DataType.string, "dataset"),
    ColSpec(DataType.string, "user_id"),
    ColSpec(AnyType(), "candidate_item_ids"),  # a list of item ids or a JSON list string
    ColSpec(AnyType(), "history_item_ids", required=False),  # same; absent: the indexed history
])
OUTPUT_SCHEMA = Schema([
    ColSpec(Array(DataType.string), "ranking"),
    ColSpec(DataType.boolean, "valid"),
    ColSpec(DataType.long, "n_tool_calls"),
    ColSpec(DataType.string, "trajectory"),
])
SIGNATURE = ModelSignature(inputs=INPUT_SCHEMA, outputs=OUTPUT_SCHEMA)


class InvalidAgentRequest(MlflowException, ValueError):
    """A bad ranking request: a ``ValueError`` in process, HTTP 400 from the scoring server."""

    def __init__(self, message: str):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


class MissingModelArtifact(FileNotFoundError):
    """A referenced (not packaged) folder is missing or holds another DVC version."""


@dataclass(frozen=True)
class ArtifactRef:
    """A folder the model uses: its path and the DVC md5 of the version logged (may be empty)."""

    path: str
    md5: str = ""

    @classmethod
    def of(cls, value: ArtifactRef | Mapping | str | os.PathLike) -> ArtifactRef:
        if isinstance(value, ArtifactRef):
            return value
        if isinstance(value, Mapping):
            unknown = sorted(set(value) - {"path", "md5"})
            if unknown or "path" not in value:
                raise ValueError(f"an artifact reference is {{'path': ..., 'md5': ...}}, got keys {sorted(value)}")
            return cls(str(Path(value["path"]).resolve()), str(value.get("md5") or ""))
        return cls(str(Path(value).resolve()))


# -- the model -----------------------------------------------------------------------------------


def requests_from_frame(frame: pd.DataFrame) -> list[dict]:
    """The request dicts of a ``dataset, user_id, candidate_item_ids[, history_item_ids]`` frame."""
    if not isinstance(frame, pd.DataFrame):
        frame = pd.DataFrame(frame)
    missing = [c for c in REQUEST_KEYS[:3] if c not in frame.columns]
    if missing:
        raise InvalidAgentRequest(f"the input has no column(s) {missing}; expected {list(REQUEST_KEYS)} "
                                  f"(history_item_ids optional), got {list(frame.columns)}")
    columns = [c for c in REQUEST_KEYS if c in frame.columns]
    return [{c: row[c] for c in columns} for row in frame[columns].to_dict(orient="records")]


class RecThinkerPyfunc(mlflow.pyfunc.PythonModel):
    """Loads the agent once (``load_context``) and ranks one request per input row (``predict``)."""

    def __init__(self):
        self.agent = None

    def load_context(self, context):
        spec = json.loads(Path(context.artifacts[CONFIG_ARTIFACT]).read_text())
        self.agent = bundle_from_spec(spec, context.artifacts).load()

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        requests = requests_from_frame(model_input)
        try:
            results = self.agent.rank(requests)
        except ValueError as error:
            raise InvalidAgentRequest(str(error)) from error
        return pd.DataFrame(results, columns=list(RESULT_KEYS))


def _expected_paths(ref: Mapping) -> list[Path]:
    paths = [Path(ref["path"])]
    home = os.environ.get(HOME_ENV)
    if home:
        relocated = Path(home) / "assets" / ref["asset"]
        relocated = relocated / ref["dataset"] if ref.get("dataset") else relocated
        if relocated not in paths:
            paths.append(relocated)
    return paths


def _restore_hint(ref: Mapping) -> str:
    artifact = f"{ref['asset']}/{ref['dataset']}" if ref.get("dataset") else ref["asset"]
    if ref.get("md5"):
        return f"`recthinker restore {artifact} {ref['md5']}` (in the project root)"
    return f"rematerialize {artifact} (no DVC md5 was logged for it)"


def resolve_reference(ref: Mapping, what: str, include_flag: str) -> Path:
    """The folder of a referenced artifact, or :class:`MissingModelArtifact` saying how to get it back."""
    paths = _expected_paths(ref)
    found = next((p for p in paths if p.is_dir()), None)
    md5 = ref.get("md5") or ""
    if found is None:
        expected = " or ".join(str(p) for p in paths)
        raise MissingModelArtifact(
            f"{what} is referenced by the model, not packaged in it, and is missing: expected the folder "
            f"{expected}{f' (DVC md5 {md5})' if md5 else ''}. Bring it back with {_restore_hint(ref)}, "
            f"set {HOME_ENV} to the project that holds it, or log the model with {include_flag}=True."
        )
    if not md5:
        return found  # no version was logged: nothing to check against
    try:
        tracked = tracked_md5(found)
    except DvcPointerError as error:  # a damaged pointer: name it, the version wanted and how to get it
        raise MissingModelArtifact(
            f"{what} at {found} cannot be checked against DVC version {md5}, the one the model was logged with: "
            f"{error}. Bring the logged version back with {_restore_hint(ref)} (it rewrites the pointer file), "
            f"or log the model with {include_flag}=True."
        ) from None
    if tracked and tracked != md5:
        raise MissingModelArtifact(
            f"{what} at {found} is DVC version {tracked}, but the model was logged with {md5}. "
            f"Bring the logged version back with {_restore_hint(ref)}, or log the model with {include_flag}=True."
        )
    return found


def bundle_from_spec(spec: Mapping, artifacts: Mapping[str, str]) -> AgentBundle:
    """The :class:`AgentBundle` described by a model's ``agent_config.json`` and its artifacts."""
    version = spec.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"agent_config.json has format_version {version!r}; this code reads {FORMAT_VERSION}")

    def folder(ref: Mapping, what: str, include_flag: str) -> Path:
        if ref.get("artifact"):
            return Path(artifacts[ref["artifact"]])
        return resolve_reference(ref, what, include_flag)

    base = folder(spec["base_model"], f"the base model ({BASE_MODEL_ASSET})", "include_base_model")
    indexes = {
        dataset: {
            name: folder(ref, f"tool index {name} of {dataset} ({ref['asset']}/{dataset})", "include_tool_indexes")
            for name, ref in refs.items()
        }
        for dataset, refs in spec["tool_indexes"].items()
    }
    adapters = [Path(artifacts[name]) for name in spec["adapters"]]
    return AgentBundle(base, adapters, indexes, ServingConfig.from_dict(spec["config"]))


# -- logging and registering ---------------------------------------------------------------------


def pip_requirements() -> list[str]:
    """Pins of the libraries the served agent imports (installed versions, without local
    labels such as ``+cpu``, which only a vendor's package index knows)."""
    pins = []
    for name in REQUIREMENTS:
        try:
            pins.append(f"{name}=={metadata.version(name).split('+')[0]}")
        except metadata.PackageNotFoundError:
            pins.append(name)
    return pins


def default_input_example(tool_indexes: Mapping[str, Mapping[str, Path]], n_candidates: int = 3) -> pd.DataFrame:
    """One request for a real user of the first dataset (from its profile and catalog indexes)."""
    from recthinker_dagster.tools import ItemCatalog, UserProfiles

    dataset = min(tool_indexes)
    profiles = UserProfiles.load(Path(tool_indexes[dataset]["profiles"]))
    catalog = ItemCatalog.load(Path(tool_indexes[dataset]["catalog"]))
    user = next((u for u in profiles.users() if profiles.history(u)[0]), None) or profiles.users()[0]
    seen = set(profiles.history(user)[0])
    candidates = [i for i in catalog.item_ids if i not in seen][:n_candidates]
    return pd.DataFrame([{"dataset": dataset, "user_id": user, "candidate_item_ids": candidates}])


class _PyfuncWithoutServingCheck:
    """``mlflow.pyfunc`` as a flavor for ``Model.log`` that accepts ``validate_serving_input``.

    ``Model.log`` reads that flag (validating the input example loads the model and predicts)
    and also hands it to the flavor's ``save_model``, which ``mlflow.pyfunc.save_model`` rejects.
    ``Model.log`` documents any object with a ``save_model`` function as a flavor."""

    @staticmethod
    def save_model(path, mlflow_model=None, validate_serving_input=None, **kwargs):
        return mlflow.pyfunc.save_model(path=path, mlflow_model=mlflow_model, **kwargs)


@contextmanager
def _run(run_id: str | None, experiment_name: str | None, run_name: str, artifact_location: str | None):
    """``run_id``'s run, else the active run, else a new run (in ``experiment_name`` if given)."""
    active = mlflow.active_run()
    if run_id is None and active is not None:
        yield active
        return
    if run_id is not None:
        if active is not None and active.info.run_id == run_id:
            yield active
            return
        with mlflow.start_run(run_id=run_id) as run:
            yield run
        return
    experiment_id = None
    if experiment_name is not None:
        experiment = mlflow.get_experiment_by_name(experiment_name)
        experiment_id = experiment.experiment_id if experiment is not None else mlflow.create_experiment(
            experiment_name, artifact_location=artifact_location)
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name) as run:
        yield run


def _metric_key(name: str) -> str:
    return name.replace("@", "_at_")


def log_agent_model(
    base_model: ArtifactRef | Mapping | str | os.PathLike,
    adapters: Sequence[str | os.PathLike],
    tool_indexes: Mapping[str, Mapping[str, ArtifactRef | Mapping | str | os.PathLike]],
    *,
    config: ServingConfig | Mapping | None = None,
    registered_model_name: str = DEFAULT_MODEL_NAME,
    include_base_model: bool = False,
    include_tool_indexes: bool = False,
    include_code: bool = True,
    input_example: pd.DataFrame | Sequence[Mapping] | None = None,
    run_id: str | None = None,
    experiment_name: str | None = None,
    artifact_location: str | None = None,
    run_name: str = "recthinker-agent",
    tags: Mapping[str, str] | None = None,
    metrics: Mapping[str, float] | None = None,
    validate_serving_input: bool = False,
    await_registration_for: int = 300,
):
    """Log the agent as a pyfunc model in an MLflow run and register it as a new version.

    ``base_model`` and each tool index are a folder path or ``{"path", "md5"}`` (the DVC md5,
    written into the config for ``recthinker restore``); ``tool_indexes`` is
    ``{dataset: {index_name: ...}}`` for every name in ``tools.INDEX_NAMES``. ``adapters`` are
    LoRA adapter folders merged in order. The run: ``run_id`` if given, else the active run,
    else a new run (in ``experiment_name`` if given, created with ``artifact_location`` when it
    does not exist). ``metrics`` (flat numbers; ``@`` becomes ``_at_``) and ``tags`` go on the
    run. Returns the new ``mlflow.entities.model_registry.ModelVersion`` (``.version``,
    ``.run_id``, ``.source``; ``str(.version)``: stores differ in its type); it is tagged with the
    referenced md5s.
    """
    base_ref = ArtifactRef.of(base_model)
    index_refs = {
        str(dataset): {str(name): ArtifactRef.of(ref) for name, ref in refs.items()}
        for dataset, refs in tool_indexes.items()
    }
    serving_config = ServingConfig.from_dict(config)
    # check every folder now, not when the model is loaded somewhere else
    AgentBundle(base_ref.path, [str(a) for a in adapters],
                {d: {n: r.path for n, r in refs.items()} for d, refs in index_refs.items()}, serving_config).check()
    unknown = sorted({n for refs in index_refs.values() for n in refs} - set(INDEX_ASSETS))
    if unknown:
        raise ValueError(f"unknown tool index names {unknown}; known: {sorted(INDEX_ASSETS)}")

    artifacts: dict[str, str] = {}
    adapter_names = []
    for k, adapter in enumerate(adapters):
        adapter_names.append(f"adapter_{k}")
        artifacts[adapter_names[-1]] = str(Path(adapter).resolve())

    def entry(ref: ArtifactRef, asset: str, dataset: str | None, artifact: str | None) -> dict:
        if artifact is not None:
            artifacts[artifact] = ref.path
        return {"asset": asset, "dataset": dataset, "path": ref.path, "md5": ref.md5, "artifact": artifact}

    spec = {
        "format_version": FORMAT_VERSION,
        "config": serving_config.to_dict(),
        "adapters": adapter_names,
        "base_model": entry(base_ref, BASE_MODEL_ASSET, None, "base_model" if include_base_model else None),
        "tool_indexes": {
            dataset: {
                name: entry(ref, INDEX_ASSETS[name], dataset,
                            f"index_{dataset}_{name}" if include_tool_indexes else None)
                for name, ref in refs.items()
            }
            for dataset, refs in index_refs.items()
        },
    }
    if input_example is None:
        input_example = default_input_example({d: {n: r.path for n, r in refs.items()} for d, refs in index_refs.items()})
    elif not isinstance(input_example, pd.DataFrame):
        input_example = pd.DataFrame(list(input_example))

    version_tags = {
        "base_model_md5": base_ref.md5 or "-",
        "base_model": "packaged" if include_base_model else "referenced",
        "tool_indexes": "packaged" if include_tool_indexes else "referenced",
        "datasets": ",".join(sorted(index_refs)),
        "n_adapters": str(len(adapter_names)),
        **{f"md5.{INDEX_ASSETS[n]}/{d}": r.md5 or "-" for d, refs in index_refs.items() for n, r in refs.items()},
    }
    with tempfile.TemporaryDirectory(prefix="recthinker-agent-") as tmp:
        config_path = Path(tmp) / CONFIG_FILE
        config_path.write_text(json.dumps(spec, indent=2))
        artifacts[CONFIG_ARTIFACT] = str(config_path)
        with _run(run_id, experiment_name, run_name, artifact_location) as run:
            if tags:
                mlflow.set_tags(dict(tags))
            if metrics:
                mlflow.log_metrics({_metric_key(k): float(v) for k, v in metrics.items() if v is not None})
            mlflow.log_dict(spec, f"{MODEL_ARTIFACT_NAME}_config.json")
            info = mlflow.models.Model.log(
                artifact_path=None,
                name=MODEL_ARTIFACT_NAME,
                flavor=_PyfuncWithoutServingCheck,
                flavor_name="pyfunc.CustomPythonModel",
                registered_model_name=registered_model_name,
                await_registration_for=await_registration_for,
                run_id=run.info.run_id,
                python_model=RecThinkerPyfunc(),
                artifacts=artifacts,
                code_paths=[str(PACKAGE_DIR)] if include_code else None,
                pip_requirements=pip_requirements(),
                signature=SIGNATURE,
                input_example=input_example,
                validate_serving_input=validate_serving_input,
            )
    client = mlflow.MlflowClient()
    version = str(info.registered_model_version)
    for key, value in version_tags.items():
        client.set_model_version_tag(registered_model_name, version, key, value)
    return client.get_model_version(registered_model_name, version)


__all__ = [
    "DEFAULT_MODEL_NAME",
    "INDEX_ASSETS",
    "SIGNATURE",
    "ArtifactRef",
    "InvalidAgentRequest",
    "MissingModelArtifact",
    "RecThinkerPyfunc",
    "bundle_from_spec",
    "log_agent_model",
    "pip_requirements",
    "requests_from_frame",
    "resolve_reference",
]
