"""``python -m captum_ext``: the ``captum-ext`` command line."""

from captum_ext.cli import main

raise SystemExit(main())
