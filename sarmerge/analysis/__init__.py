"""Analysis reports (SPEC §7): update geometry of checkpoint families and token-level divergence from the base."""

from sarmerge.analysis.geometry import analyze_geometry, geometry_report
from sarmerge.analysis.report import render_report
from sarmerge.analysis.tokens import analyze_tokens, js_divergence, token_report

__all__ = ["analyze_geometry", "analyze_tokens", "geometry_report", "js_divergence", "render_report", "token_report"]
