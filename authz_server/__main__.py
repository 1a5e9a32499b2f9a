"""`python -m authz_server` is the `mcp-authz` command."""

import sys

from authz_server.cli import main

sys.exit(main())
