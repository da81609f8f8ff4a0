from pyroute.commands.cli import main

raise SystemExit(main())
