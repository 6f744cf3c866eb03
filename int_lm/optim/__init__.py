"""Update rules: how the population's exact integer votes move the int8 weights.

Each rule is one module whose ``make(es_config)`` returns a :class:`base.UpdateRule`:
pure ``init`` / ``schedule`` / ``update`` functions over an explicit integer state
(int32 or smaller, saved in checkpoints). ``es.optimizer`` picks one:

* ``sign`` (:mod:`.sign`): the paper's thresholded +-1 vote, no state (the published recipe).
* ``momentum`` (:mod:`.momentum`): integer momentum of the normalised votes moving int16
  master weights (``es.master_bits`` below the int8 weight) by linear, unthresholded steps.

To add a rule: a module here with ``make(es)``, one line in :data:`RULES`, its
settings in ``config.ESConfig``, and a NumPy twin of its update in ``tests/test_optim.py``.
"""
from __future__ import annotations

from int_lm.optim import momentum, sign
from int_lm.optim.base import UpdateRule, alpha_at, thresholds  # noqa: F401 (the public API)

# es.optimizer -> the module (anything with ``make(es)``, optionally ``check_limits(es)``).
RULES = {
    "sign": sign,
    "momentum": momentum,
}


def check_limits(es) -> None:
    """Refuse the chosen rule's settings outside its documented bounds (a UserError naming the key)."""
    module = RULES[es.optimizer]
    if hasattr(module, "check_limits"):
        module.check_limits(es)


def make(es) -> UpdateRule:
    """The update rule ``es.optimizer`` names, built for the ``ESConfig`` ``es``."""
    return RULES[getattr(es, "optimizer", "sign")].make(es)
