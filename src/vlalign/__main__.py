from vlalign.cli.main import main

raise SystemExit(main())
