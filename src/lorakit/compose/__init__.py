"""Adapter arithmetic on the Adapter value: exact sums (linear, cat), truncation (svd), the task-vector
merges (ties, dare_linear, dare_ties, magnitude_prune), and the collision report."""

from lorakit.compose.compose import METHODS, Composition, Ingredient, compose, composition

__all__ = ["METHODS", "Composition", "Ingredient", "compose", "composition"]
