"""ExpertFlow runtime: ``load`` a compiled directory and run it with a fixed expert-slot budget."""

from .load import LoadError, load, parse_budget
from .model import CompiledModel

__all__ = ["CompiledModel", "LoadError", "load", "parse_budget"]
