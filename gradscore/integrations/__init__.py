"""Bridges to other libraries; each module imports its optional dependency lazily."""
