"""Command-line entry points (the ``cmjax-*`` console scripts of pyproject.toml)."""
