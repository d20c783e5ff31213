"""One module per family; importing a module registers its models with timm."""
from . import cbam, eca  # noqa: F401
from . import nat  # noqa: F401
from . import halonet  # noqa: F401
from . import biformer  # noqa: F401
from . import agent_swin  # noqa: F401
from . import agent_pvt  # noqa: F401
from . import mala  # noqa: F401
