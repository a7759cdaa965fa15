"""Helpers shared by the test modules: paths, throwaway projects, real trajectories, a registry.

``paths`` is the one place that says where the repository, the shared data and the download
cache are; the fixtures in ``tests/conftest.py`` wrap these helpers.
"""
