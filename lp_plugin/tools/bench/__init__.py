"""lp-bench: what offloading costs and saves, measured against the plain model in one run.

``lp-bench --model qwen2.5-3b-shape --configs baseline,session:even:cpu,stream:even:cpu --out r.json``;
see ``lp-bench --help`` and :mod:`lp_plugin.tools.bench.configs` for the config grammar. Importing this
package does not import torch.
"""

from __future__ import annotations

from .configs import BenchConfig, ConfigError, parse_config, parse_configs

__all__ = ["BenchConfig", "ConfigError", "parse_config", "parse_configs", "main"]


def main(argv=None) -> int:
    from .cli import main as _main

    return _main(argv)
