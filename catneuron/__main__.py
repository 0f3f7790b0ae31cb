from catneuron.cli import main

raise SystemExit(main())
