from authz.cli import main

raise SystemExit(main())
