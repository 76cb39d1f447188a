"""`python -m cmjax.export`: the command line lives in cmjax/cli/export.py."""
from cmjax.cli.export import main

if __name__ == "__main__":
    raise SystemExit(main())
