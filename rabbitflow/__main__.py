import sys

from rabbitflow.cli.main import main

sys.exit(main())
