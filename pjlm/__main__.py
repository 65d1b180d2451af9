import sys

from pjlm.cli import main

sys.exit(main())
