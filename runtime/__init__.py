"""ExpertFlow runtime: ``load`` a compiled directory and run it with a fixed expert-slot budget."""

from .load import (Budget, LoadError, budget_argument, check_budget, check_device, load, load_tokenizer,
                   parse_budget)
from .model import CompiledModel

__all__ = ["Budget", "CompiledModel", "LoadError", "budget_argument", "check_budget", "check_device", "load",
           "load_tokenizer", "parse_budget"]
