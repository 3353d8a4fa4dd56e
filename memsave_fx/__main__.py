"""`python -m memsave_fx plan pkg.module:factory`: the `memsave-fx` command."""

from .cli import main

raise SystemExit(main())
