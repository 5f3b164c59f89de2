"""Demo model family: a small MLP pretrained on digits and fine-tuned on digits variants."""

from .family import build_family, evaluate, FamilyPaths, TASKS
