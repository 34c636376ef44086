"""TREAD token routing for any BlockStack backbone."""
from .routes import Route, parse_routes, validate_routes
from .router import RoutedNetwork, gather_tokens, scatter_tokens
from .selection import SELECTIONS, kept_count, kept_tokens, random_selection, row_selection, select

__all__ = ["Route", "parse_routes", "validate_routes", "RoutedNetwork", "gather_tokens", "scatter_tokens",
           "SELECTIONS", "kept_count", "kept_tokens", "random_selection", "row_selection", "select"]
