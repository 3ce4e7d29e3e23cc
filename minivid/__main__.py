import sys

try:
    from minivid.cli import main
except KeyboardInterrupt:               # Ctrl-C before main() installs its handlers
    print("minivid: interrupted while starting; nothing was written", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
