"""The CLIP models: one :class:`~pixfind.models.base.Encoder` contract and its runtimes."""
