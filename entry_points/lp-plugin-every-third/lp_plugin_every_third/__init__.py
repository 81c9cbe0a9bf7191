"""An example third-party lp_plugin plugin: contributes the offload policy ``every-third``
(every third layer between the protected ends, starting at the first unprotected one).

Install it (``pip install entry_points/lp-plugin-every-third``) and use it by name:
``lp_plugin.attach(model, offload="every-third")``.
"""

from lp_plugin.hookspecs import hookimpl
from lp_plugin import OffloadPolicy


class EveryThird(OffloadPolicy):
    name = "every-third"
    description = "every third layer between the protected ends"

    def select(self, num_layers, lo, hi):
        return range(lo, hi + 1, 3)


@hookimpl
def register_policies(register):
    register(EveryThird())
