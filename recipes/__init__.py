"""Shipped recipes (YAML data). `edgec.pipeline.recipe` reads them from this package."""
