from gemma3vl.cli import main

raise SystemExit(main())
