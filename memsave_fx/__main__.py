"""`python -m memsave_fx plan ...` and `python -m memsave_fx selftest`: the `memsave-fx` command."""

from .cli import main

raise SystemExit(main())
