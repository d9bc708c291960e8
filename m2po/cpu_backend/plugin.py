"""The CPU backend's own `verl.plugins` entry point (`m2po_cpu`), separate from the losses' (`m2po`).

`import verl` loads every entry point on its own and swallows its errors, so a failure here can never
keep the M2PO losses or trainers from registering. What it does: registers the OmegaConf resolvers of
the `+cpu=tiny` overlay (always; cheap, changes nothing) and activates the backend only when it is
selected with `VERL_PLATFORM=cpu`.
"""

from m2po import cpu_backend
from m2po.cpu_backend.config import register_resolvers

register_resolvers()
if cpu_backend.is_selected():
    cpu_backend.activate()
