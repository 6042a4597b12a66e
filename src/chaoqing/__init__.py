"""chaoqing (超清): photo super-resolution with face enhancement, served by a concurrent gateway."""

__all__ = ["__version__"]

__version__ = "0.1.0"
