from kprpe.cli import main

raise SystemExit(main())
