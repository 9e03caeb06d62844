"""GEMM sites: every weight parameter a linear or convolution GEMM consumes, found at the functional
level and shared by capture and train (see :mod:`.site` and :mod:`.intercept`).

Quick use::

    from nmgrad_cli.sites import ParamIndex, SiteMode, unintercepted
    index = ParamIndex(model)
    with SiteMode(index) as mode:          # handler=None: every GEMM runs dense
        loss = loss_fn(model(x), y)
    loss.backward()
    print(list(mode.sites), unintercepted(index, mode))
"""

from .intercept import CONV_FN, NotInterceptedError, SiteMode, SiteReport, dense_gemm, site_report, unintercepted
from .site import GEMMS, MODULE_TYPE, ParamIndex, Site, site_name

__all__ = [
    "CONV_FN", "GEMMS", "MODULE_TYPE", "NotInterceptedError", "ParamIndex", "Site", "SiteMode", "SiteReport",
    "dense_gemm", "site_name", "site_report", "unintercepted",
]
