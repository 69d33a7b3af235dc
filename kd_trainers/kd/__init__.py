"""Vanilla logit knowledge distillation: `KDConfig` and `KDTrainer`."""

from ..runtime.lazy import lazy_getattr


# Loaded on first use; `method.py` registers the method for recipes.
_EXPORTS = {"KDConfig": ".config", "KDTrainer": ".trainer"}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_getattr(__name__, globals(), _EXPORTS)
