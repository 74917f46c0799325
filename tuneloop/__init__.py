"""The top of the layering: the ``tuneloop`` command and the nightly pipeline, which import every package.

They live in a package named after the distribution, not as top-level ``cli``/``pipeline`` modules,
so no file in a user's working directory can stand in for them.
"""
