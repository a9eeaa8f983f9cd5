"""OpenDP's core API under the names `opendp.prelude` gives it (dp.m, dp.t, dp.c, domains, metrics, ...).

`opendp.prelude` also imports OpenDP's extras, which import scikit-learn and SciPy: about 1.5 s
of CPU in every process that starts, and every site guard, ClientApp and ServerApp starts one. The
privacy paths only need the core, so they import it from here.
"""

from opendp.mod import *  # noqa: F401,F403  (enable_features, binary_search, OpenDPException, ...)
from opendp.domains import *  # noqa: F401,F403
from opendp.metrics import *  # noqa: F401,F403
from opendp.measures import *  # noqa: F401,F403
from opendp.typing import *  # noqa: F401,F403
import opendp.combinators as c  # noqa: F401
import opendp.measurements as m  # noqa: F401
import opendp.transformations as t  # noqa: F401
