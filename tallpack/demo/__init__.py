"""A small, real, reproducible model family (scikit-learn digits variants) for the demo and benchmarks."""

from .family import TASKS, FamilyPaths, build_family, evaluate

__all__ = ["TASKS", "FamilyPaths", "build_family", "evaluate"]
