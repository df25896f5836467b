"""Structured removal: dependency groups and ``shrink`` — masked channels become a
physically smaller dense model."""

from sparsekit.structured.dependency import Group, Slice, dependency_groups
from sparsekit.structured.shrink import shrink
from sparsekit.structured.transformer import transformer_groups

__all__ = ["Group", "Slice", "dependency_groups", "shrink", "transformer_groups"]
