"""`python -m cmjax.convert`: the command line lives in cmjax/cli/convert.py."""
from cmjax.cli.convert import main

if __name__ == "__main__":
    raise SystemExit(main())
