import sys

from txregistry.cli import main

sys.exit(main())
