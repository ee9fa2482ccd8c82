"""Errors the method raises for bad input. Each carries a message meant for a person."""

from __future__ import annotations


class BoomerangError(Exception):
    """Base class: a problem with the user's input or files, never a bug."""


class UnsupportedArchitecture(BoomerangError):
    pass


class IncompatiblePair(BoomerangError):
    """Teacher and student do not belong together (architecture, hidden size, vocabulary...)."""


class StudentConfigError(BoomerangError):
    """A malformed or inconsistent student_config.json."""


class SizeOutOfRange(BoomerangError):
    pass


class ModelNotFound(BoomerangError):
    pass


class CorpusError(BoomerangError):
    """A text source that is missing, empty or unreachable."""


class RecipeError(BoomerangError):
    """Distillation settings that cannot work (a negative budget, a zero learning rate...)."""
