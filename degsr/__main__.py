from degsr.cli import main

raise SystemExit(main())
