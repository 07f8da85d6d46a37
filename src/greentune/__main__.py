from greentune.cli import main

raise SystemExit(main())
