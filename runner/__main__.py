"""`python -m mv4d.runner ...`"""

from .cli import main

raise SystemExit(main())
