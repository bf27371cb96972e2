"""The registry of self-supervised methods: one small module per method, a plain dict here."""

from umm_jax.methods import (
  barlow_twins,
  bcl_i,
  byol,
  corinfomax,
  lmcl,
  mec,
  moco,
  relic,
  ressl,
  sdclr,
  simclr,
  simsiam,
  ssl_hsic,
  swav,
  vicreg,
  wmse,
)
from umm_jax.methods.base import Method

_MODULES = (
  simclr,
  moco,
  simsiam,
  byol,
  relic,
  barlow_twins,
  vicreg,
  wmse,
  swav,
  mec,
  corinfomax,
  ressl,
  ssl_hsic,
  lmcl,
  sdclr,
  bcl_i,
)
REGISTRY: dict[str, Method] = {m.name: m for module in _MODULES for m in module.METHODS}


def get(name: str) -> Method:
  """The registered method called `name`; a `ValueError` lists the valid names otherwise."""
  if name not in REGISTRY:
    raise ValueError(f"Unknown method {name!r}; valid methods: {sorted(REGISTRY)}")
  return REGISTRY[name]
