"""Leaf helpers every room shares; imports nothing from the project."""
