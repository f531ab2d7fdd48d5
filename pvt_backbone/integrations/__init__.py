"""Adapters that put a ``PVTv2Backbone`` inside other libraries' heads.

Each submodule imports its library at module level, so none of them is imported by ``import pvt_backbone`` or by
this package: import the one you need, e.g. ``from pvt_backbone.integrations.transformers import swap_backbone``
(extra ``[hf]``).
"""

__all__: list[str] = []
