import sys

from sdrt.runtime.cli import main

sys.exit(main())
