"""Training-time defences behind one interface (:class:`Defense`), looked up by config name."""

from ask.defenses import ask_def, at, none, trades  # noqa: F401  (each registers its option)
from ask.defenses.base import DEFENSES, Defense, build_defense, defense_class, register_defense

__all__ = ["DEFENSES", "Defense", "build_defense", "defense_class", "register_defense"]
