"""The filter registry: job YAML names -> filter classes."""

from pipeline.units import Registry, Unit

FILTERS: Registry[Unit] = Registry("filter")
