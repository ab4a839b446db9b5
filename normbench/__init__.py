"""normbench: normalization layers x batch size x placement, reproducing Group Normalization.

The library needs no Hydra. The pieces, from plain arguments::

    import normbench
    norm = normbench.build_norm("gn", 64, groups=32)
    model = normbench.build_model("resnet50", num_classes=1000, norm="gn", batch=2)
    summary = normbench.run(config_dict, "runs/mine/one")   # a whole run, as run.py does
    cfg = normbench.parse_config(config_dict)   # the typed RunConfig: cfg.norm.name, cfg.optim...

``normbench.NORMS`` and ``normbench.MODELS`` are the registries (name -> spec).
"""

from .config import ConfigError, RunConfig, parse_config
from .models import MODELS, PLACEMENTS, build_model
from .norms import ACTIVATIONS, NORMS, build_activation, build_norm, norm_options
from .train import run

__all__ = ["ACTIVATIONS", "MODELS", "NORMS", "PLACEMENTS", "ConfigError", "RunConfig",
           "build_activation", "build_model", "build_norm", "norm_options", "parse_config", "run"]
__version__ = "0.1.0"
