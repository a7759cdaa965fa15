"""LLM backends behind one interface (``base.Backend``); heavy imports happen on first use."""

from recthinker_dagster.agent.backends.base import Backend, Generation, SamplingParams

__all__ = ["Backend", "Generation", "OpenAICompatibleBackend", "SamplingParams", "TransformersBackend"]


def __getattr__(name: str):
    if name == "TransformersBackend":
        from recthinker_dagster.agent.backends.transformers_backend import (
            TransformersBackend,
        )

        return TransformersBackend
    if name == "OpenAICompatibleBackend":
        from recthinker_dagster.agent.backends.openai_backend import (
            OpenAICompatibleBackend,
        )

        return OpenAICompatibleBackend
    raise AttributeError(name)
