"""`python -m cmjax.eval`: the command line lives in cmjax/cli/eval.py."""
from cmjax.cli.eval import main

if __name__ == "__main__":
    raise SystemExit(main())
