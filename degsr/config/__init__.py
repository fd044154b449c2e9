"""Typed, validated run configuration (OmegaConf structured configs).

Names load lazily: section schemas live beside their code (``degsr/*/config.py``) and import
``degsr.config.fields``, which must not pull in the whole schema first.
"""

__all__ = ["Config", "flatten", "load_config", "save_config", "to_yaml", "validate"]


def __getattr__(name: str):
    if name == "Config":
        from degsr.config.schema import Config
        return Config
    if name in __all__:
        from degsr.config import loader
        return getattr(loader, name)
    raise AttributeError(f"module 'degsr.config' has no attribute {name!r}")
