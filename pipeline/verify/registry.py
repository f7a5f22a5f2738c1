"""The verifier registry: job YAML names -> verifier classes."""

from pipeline.units import Registry, Unit

VERIFIERS: Registry[Unit] = Registry("verifier")
