from otelproxy.cli import main

if __name__ == "__main__":  # guarded: the recorder process is spawned and re-imports __main__
    raise SystemExit(main())
