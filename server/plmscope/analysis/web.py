"""Hook for web/app.py's optional router import: the /analysis routes live in web/routes/analysis.py."""

from ..web.routes.analysis import router

__all__ = ["router"]
