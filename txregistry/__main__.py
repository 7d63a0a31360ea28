import sys

from txregistry.cli.main import main

sys.exit(main())
