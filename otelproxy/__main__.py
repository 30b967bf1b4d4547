from otelproxy.cli import main

raise SystemExit(main())
