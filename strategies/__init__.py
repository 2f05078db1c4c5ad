"""Federated algorithms as plug-ins (see `strategies.registry`); the built-in ones register
themselves when imported, one line each. A new algorithm: a package here + one line below."""

from strategies import registry  # noqa: F401  (first: the plug-ins register into it)
from strategies import lora  # noqa: F401  fedavg, hetlora, flexlora (S1)
from strategies import fedkd  # noqa: F401  fedkd (S3)
from strategies import unlearn  # noqa: F401  unlearn (S4)
from strategies import submodel  # noqa: F401  submodel (S7)
