from __future__ import annotations

import sys

from envlock.cli import main

sys.exit(main())
