import sys

try:
    from catneuron.cli import main
except KeyboardInterrupt:  # Ctrl-C in the first milliseconds, before the dispatcher's handler
    command = " ".join(["catneuron", *sys.argv[1:2]])
    print(f"{command}: interrupted", file=sys.stderr)
    raise SystemExit(130) from None

raise SystemExit(main())
