"""HTTP routes: pages (HTML + JSON twins + CSV), the inference API and health checks."""
