"""`python -m cmjax.edit`: the command line lives in cmjax/cli/edit.py."""
from cmjax.cli.edit import main

if __name__ == "__main__":
    raise SystemExit(main())
