"""OFER: occluded face expression reconstruction with conditional diffusion over FLAME.

    import ofer
    model = ofer.load_demo()            # or ofer.load(idrank=..., idgen=..., expgen=..., cfg=...)
    result = model.reconstruct_crop("data/synthetic/test/clear_00.jpg")

See `ofer.api`. The API is imported on first use, so `import ofer` itself stays cheap.
"""

__version__ = "0.1.0"
__all__ = ["ImageError", "OferModel", "Result", "load", "load_demo"]


def __getattr__(name: str):
    if name in __all__:
        from ofer import api

        return getattr(api, name)
    raise AttributeError(f"module 'ofer' has no attribute {name!r}")
